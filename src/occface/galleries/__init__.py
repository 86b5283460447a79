"""Galleries on disk and 1:N search.

    from occface.galleries import Gallery
    results = Gallery.open("staff.gallery").search(["probe.jpg"], top=10)

Modules: ``shards`` (the files: manifest, shards, entries), ``gallery`` (Gallery: open, enrol,
remove, the write lock), ``search`` (FAISS shortlist and the calibrated re-rank), ``inputs``
(what ``occface enroll`` takes).
"""
from .gallery import EXACT_UP_TO, IVF_PROBES, EnrollSummary, Gallery
from .inputs import enrollment_items
from .search import Candidate, SearchIndex, SearchResult, fusion_for_search
from .shards import FORMAT, VERSION, Entry, NpyRows, model_fingerprint

__all__ = ["EXACT_UP_TO", "FORMAT", "IVF_PROBES", "VERSION", "Candidate", "EnrollSummary", "Entry", "Gallery", "NpyRows",
           "SearchIndex", "SearchResult", "enrollment_items", "fusion_for_search", "model_fingerprint"]
