"""Evaluation: ``occface eval``, its pairs, metrics and reports.

Modules: ``pairs`` (images with synthesised occluders, verification pairs by pair type),
``metrics`` (10-fold accuracy, ROC, TAR at FAR, paired-bootstrap comparisons), ``reports``
(tables, metrics.json, plots), ``run`` (``occface eval``: run_eval, identification).
"""
from .metrics import PAIR_TYPES, compare_sources, evaluate_pairs, threshold_at_far
from .pairs import OCCLUDE_SIDES, OcclusionPairs, VariantDataset
from .reports import comparison_table, summary_table
from .run import evaluate_occlusion_pairs, identification, parse_occlusion_specs, read_occluded_list, run_eval

__all__ = ["OCCLUDE_SIDES", "PAIR_TYPES", "OcclusionPairs", "VariantDataset", "compare_sources", "comparison_table",
           "evaluate_occlusion_pairs", "evaluate_pairs", "identification", "parse_occlusion_specs", "read_occluded_list",
           "run_eval", "summary_table", "threshold_at_far"]
