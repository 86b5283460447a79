"""``occface demo``: the end-to-end run on embedded procedural faces, minutes on a laptop CPU.

Generates procedural identities, trains the ``demo_cpu.yaml`` configuration on 40 of them with
niqab and medical-mask occlusions synthesised on 80% of the faces, evaluates on the 20 held-out
identities (clean-clean, occluded-clean and occluded-occluded pairs) and writes a report folder.
"""
from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path

from .config import load_config
from .evaluation.run import OcclusionPairs, evaluate_occlusion_pairs
from .models.occface import OccFaceModel
from .evaluation.reports import comparison_table, summary_table, write_report
from .scoring import calibrated_fusion_weight, describe_fusion_weight
from .training.loop import Trainer, build_data

log = logging.getLogger(__name__)


def default_config_path(name: str = "demo_cpu.yaml") -> Path:
    return Path(str(resources.files("occface") / "configs" / name))


def run_demo(out: str | Path, overrides: list[str] | None = None, eval_pairs: int = 300) -> Path:
    """Train and evaluate; returns the report folder."""
    started = time.perf_counter()
    out = Path(out)
    config = load_config(default_config_path(), [f"train.out_dir={out / 'run'}", *(overrides or [])])
    summary = Trainer(config).fit()
    model = OccFaceModel.from_pretrained(out / "run" / "model")
    data = build_data(config)  # the same split and occluders as training; only the held-out part is used
    pairs = OcclusionPairs.build(data.holdout, data.synthesizer, eval_pairs, seed=config.train.seed + 2)
    fusion_weight = calibrated_fusion_weight(model)  # as `occface eval` uses it
    metrics, scores, features = evaluate_occlusion_pairs(model, pairs, fusion_weight=fusion_weight, keep_masks=True)
    extra = {
        "config": str(out / "run" / "config.yaml"),
        "model": f"{config.model.arch} width {config.model.width}, {config.model.feature_level} maps",
        "training": f"{summary['steps']} steps, {summary['images_per_second']:.1f} images/s, {summary['seconds']:.0f} s",
        "held-out identities": data.holdout.num_classes,
        "fusion shares": describe_fusion_weight(fusion_weight),
        "total time": f"{time.perf_counter() - started:.0f} s",
    }
    report = write_report(out / "report", metrics, scores, pairs, features, "occface demo: procedural faces, held-out identities", extra)
    print("\nVerification accuracy on held-out identities (10-fold):\n")
    print(summary_table(metrics))
    comparisons = json.loads((report / "metrics.json").read_text())["comparisons"]
    print("\nROC AUC differences, 95% paired-bootstrap intervals over the pairs:\n")
    print(comparison_table(comparisons))
    print(f"\nreport: {report} (total {time.perf_counter() - started:.0f} s)")
    return report
