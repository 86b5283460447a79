"""Kept for code written against earlier versions: ``occface align`` lives in :mod:`occface.photos.folder`."""
from .photos.folder import FAILURE_COLUMNS, LANDMARK_COLUMNS, AlignSummary, align_folder, list_photos  # noqa: F401
