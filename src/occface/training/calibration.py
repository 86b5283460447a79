"""What a trained model stores from its validation people: each source's threshold, the fusion's
normalisation and shares per visibility stratum (pairs), and the re-rank for search."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError, load_config
from ..evaluation.run import OcclusionPairs, evaluate_occlusion_pairs
from ..models import OccFaceModel
from ..evaluation.metrics import evaluate_pairs, threshold_at_far
from .search_calibration import calibrate_search
from ..scoring import (choose_fusion_weights, choose_strata_rule, describe_fusion_weight, fuse, fusion_normalization,
                      pair_strata)

from .data import build_data

log = logging.getLogger(__name__)


def calibrate(scores: dict[str, np.ndarray], issame: np.ndarray, strata: np.ndarray, choose_weights: bool = True,
              far: float = 0.01, rule: dict | None = None) -> tuple[dict, np.ndarray]:
    """What a model stores from its validation pairs (scores of every source, labels, predicted
    visibility strata and the ``rule`` that gave them): the fusion's normalisation, its weights per
    stratum (:func:`choose_fusion_weights`; the spec's 0.5 if ``choose_weights`` is false), and each
    source's threshold at ``far``, the fused one on the fused scores recomputed with those weights.
    Returns (calibration, those fused scores [N])."""
    scores = dict(scores)
    normalization = fusion_normalization(scores, strata, rule)
    weight = choose_fusion_weights(scores, issame, strata) if choose_weights else 0.5
    scores["fused"] = fuse(scores, normalization, weight, strata)
    log.info("fusion shares: %s", describe_fusion_weight(weight))
    calibration: dict = {source: {"far": far, "threshold": threshold_at_far(values, issame, far)}
                         for source, values in scores.items()}
    calibration.update(normalization=normalization, fusion_weight=weight)
    return calibration, scores["fused"]


def calibrate_on(model: OccFaceModel, validation: OcclusionPairs, config: Config,
                 device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Score ``model`` on the validation pairs and return (its calibration, :func:`calibrate`, with
    the strata rule and fusion choices of ``config.train``; the metrics of every source, the fused
    one scored as the saved model will fuse: with the rule and the weights chosen on these pairs).
    A run that does not train QAConv (:func:`trains_qaconv`) gets the embedding's threshold alone."""
    metrics, scores, features = evaluate_occlusion_pairs(model, validation, device=device, precision="fp32")
    if not trains_qaconv(config):  # QAConv and the occlusion head never learned: only the embedding decides
        values = scores["embedding"]
        return {"embedding": {"far": 0.01, "threshold": threshold_at_far(values, validation.issame, 0.01)}}, metrics
    rule = choose_strata_rule(features.occlusion, features.occluded.numpy()) if config.train.calibrate_strata else None
    strata = pair_strata(features, validation.pairs, rule)
    calibration, fused = calibrate(scores, validation.issame, strata, config.train.calibrate_fusion, rule=rule)
    metrics["fused"] = evaluate_pairs({"fused": fused}, validation.issame, validation.types, validation.folds)["fused"]
    return calibration, metrics


def trains_qaconv(config: Config) -> bool:
    """Whether a run trains QAConv (its pair loss has a weight): a run without (an embedding-only
    fine-tune) is calibrated and searched by its embedding alone, as its QAConv and occlusion head
    are the untrained initialisation."""
    return config.loss.qaconv_weight > 0


def recalibrate(run_dir: str | Path) -> dict:
    """Calibrate the model a finished run saved (``RUN/model``) again, on the validation pairs its
    ``RUN/config.yaml`` draws, with this version's rules (e.g. a model trained before the fusion
    weights came from the discriminant); the weights are untouched. Returns the new calibration."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    validation = build_data(config).validation
    if validation is None:
        raise ConfigError(f"{run_dir / 'config.yaml'}: the run has no validation identities to calibrate on")
    model = OccFaceModel.from_pretrained(run_dir / "model")
    model.config.calibration, _ = calibrate_on(model, validation, config)
    model.config.calibration["precision"] = "fp32"  # calibrate_on scores in fp32
    if config.train.calibrate_search and trains_qaconv(config):
        data = build_data(config)
        search = calibrate_search(model, data.holdout, data.synthesizer, seed=config.train.seed + 2)
        if search is not None:
            model.config.calibration["search"] = search
    model.save_pretrained(run_dir / "model")
    return model.config.calibration
