"""LFW's standard protocol with niqabs (and medical masks), on real faces, on 2 CPU cores.

From scratch (the default):

1. Train the CPU configuration on CFP's 500 people and the 18 training people of faces112 (never
   LFW), with niqab and medical-mask overlays synthesised on 80% of the faces; the 5 test people of
   faces112 are the validation set that calibrates the model's thresholds and its fusion weights per
   pair type (1,000 pairs a type). Two changes to the demo config, both studied in the README:
   QAConv and the occlusion head on block 3's 14x14 maps, for 1,000 steps of 48 faces; and the
   QAConv pair loss weighted 100 against AdaFace's 1.
2. Evaluate on LFW's official 6,000 pairs (10 folds): clean, a niqab on the second face of every
   pair (occluded-clean) and on both faces (occluded-occluded).

    python benchmarks/niqab_lfw.py --data ../shared/data --out runs/niqab_lfw

From a pretrained network (``--pretrained``, ``configs/finetune_mobilefacenet.yaml``):

1. Fine-tune the full model (occlusion head, QAConv, fusion; distillation from the frozen original)
   and, on the same data for the same steps, the embedding-only baseline (distillation alone: the
   student's embedding of the occluded face towards the original's embedding of the clean face).
   The config's recipe: every layer, 705 steps of 64 faces, constant learning rate, no augmentation
   beyond the overlays, QAConv on block 4's 7x7 maps.
2. Evaluate on LFW's official pairs, clean and with niqab / medical-mask overlays on one or both
   faces: the untouched network, the baseline and the four sources of the full model, with paired-
   bootstrap intervals. ``--held-out-occluders`` adds the procedural niqab and mask, which training
   never saw. ``--runtime onnx`` runs the frozen teacher and the evaluated networks in ONNX Runtime
   (fp32; faster on CPUs), the rest as before.

    python benchmarks/niqab_lfw.py --data ../shared/data --pretrained ../shared/models/mobilefacenet_ms1m.pt \\
        --out runs/niqab_lfw_pretrained [--seed N] [--steps N] [--held-out-occluders] [--runtime onnx]

Writes DIR/metrics.json, DIR/report.md (pretrained mode: DIR/pretrained.json and the models in
DIR/full/model and DIR/baseline/model).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from occface.config import load_config
from occface.data.images import file_sha256
from occface.demo import default_config_path
from occface.scoring import (calibrated_fusion_weight, describe_fusion_weight, embedding_scores, extract_features,
                             Features, pair_scores)
from occface.metrics import compare_sources, evaluate_pairs
from occface.reports import comparison_table, summary_table
from occface.evaluate import run_eval, VariantDataset
from occface.train import Trainer, recalibrate

NEEDED = ("cfp112", "faces112", "faces112_split.json", "lfw112", "lfw112_pairs.txt", "occluders")


def data_overrides(data: Path) -> list[str]:
    """Training on CFP and faces112's training people; faces112's test people validate."""
    return ["data.source=folder", f"data.path={data / 'faces112'}", f"data.split_file={data / 'faces112_split.json'}",
            f"data.extra_paths=[{data / 'cfp112'}]", "data.recursive=true", f"data.occluders={data / 'occluders'}",
            "train.val_identities=0", "train.val_pairs=1000"]


def from_scratch(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    run_dir = args.out / "run"
    config = load_config(default_config_path(), [
        *data_overrides(args.data), "data.occlusion_kinds=[niqab, mask]", "data.crop=0.1",
        f"train.max_steps={args.steps or 1000}", "train.checkpoint_every=100", "train.image_grid_every=200",
        "optim.warmup_steps=50", "model.feature_level=block3", "loss.qaconv_weight=100", f"train.out_dir={run_dir}",
        f"train.seed={args.seed}", *args.overrides,
    ])
    summary = Trainer(config).fit()
    trained = time.perf_counter() - started
    model_dir = args.out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(run_dir / "model", model_dir)
    data = args.data
    result = run_eval(model_dir, args.out, pairs_file=data / "lfw112_pairs.txt", root=data / "lfw112",
                      occlude=["none", "niqab:probe", "niqab:both"], occluders=data / "occluders")
    sources = {k: v for k, v in result.items() if k in ("embedding", "qaconv", "qaconv_weighted", "fused")}
    print("\nLFW, 6,000 official pairs, 10-fold accuracy (niqab overlays synthesised on the second / both faces):\n")
    print(summary_table(sources))
    print("\nTAR at FAR 1e-2:\n")
    print(summary_table(sources, "tar@far=1e-2"))
    print("\nROC AUC differences, 95% paired-bootstrap intervals over the pairs (this model, not across runs):\n")
    print(comparison_table(result["comparisons"]))
    print(f"\ntraining: {summary['steps']} steps, {summary['images_per_second']:.1f} images/s, {trained:.0f} s; "
          f"total {time.perf_counter() - started:.0f} s; report and metrics: {args.out}")
    return 0


# ---------------------------------------------------------------- from a pretrained network
def concat_features(parts: Iterable[Features], sizes: list[int]) -> Features:
    """The parts (``sizes`` faces each, in order) as one Features. Each part is copied into tensors
    allocated once for all of them and dropped before the next is made, so the whole is held once
    beside one part (``torch.cat`` of all parts would hold every part twice at its peak)."""
    total, start, whole = sum(sizes), 0, {}
    for part in parts:
        count = len(part.embedding)
        for name in ("embedding", "feature_map", "occlusion", "occluded"):
            tensor = getattr(part, name)
            if name not in whole:  # maps not kept are [0, C, H, W] in every part
                whole[name] = tensor.new_empty((total if len(tensor) else 0, *tensor.shape[1:]))
            if len(tensor):
                whole[name][start : start + count] = tensor
        start += count
        del part, tensor
    if start != total:
        raise ValueError(f"the parts hold {start} faces, the sizes say {total}")
    return Features(**whole)


#: The occluders the LFW evaluation can synthesise: name -> (synthesizer source, kind). "overlay": the
#: RGBA images in occluders/; "procedural": occface's flat drawn niqab and mask (no head outline);
#: "drawn": the generator of occluders as a distribution (occface.data.drawn_occluders).
OCCLUDERS = {"niqab": ("overlay", "niqab"), "mask": ("overlay", "mask"),
             "procedural niqab": ("procedural", "niqab"), "procedural mask": ("procedural", "mask"),
             "veil": ("drawn", "veil"), "facemask": ("drawn", "facemask")}
for _sub in ("slit", "two-hole", "sheer", "full"):
    OCCLUDERS[f"veil/{_sub}"] = ("drawn", f"veil/{_sub}")


def lfw_base(data: Path, first_pairs: int | None = None):
    """(LFW's official pairs, their images as a dataset); ``first_pairs``: only N pairs of the first
    fold, half same and half different, and the images they use (a quick look)."""
    import dataclasses

    from occface.data import ImageListDataset, read_pairs_txt

    pair_set = read_pairs_txt(data / "lfw112_pairs.txt", data / "lfw112")
    if first_pairs:
        half = min(first_pairs // 2, 300)
        chosen = np.concatenate([np.arange(half), 300 + np.arange(half)])  # fold 1: 300 same, then 300 not
        pairs = pair_set.pairs[chosen]
        used, remapped = np.unique(pairs, return_inverse=True)
        pair_set = dataclasses.replace(pair_set, images=[pair_set.images[i] for i in used],
                                       pairs=remapped.reshape(pairs.shape), issame=pair_set.issame[chosen],
                                       folds=None)
    return pair_set, ImageListDataset(pair_set.images, input_size=112)


def occluder_dataset(data: Path, base, name: str, seed: int):
    """The LFW images with occluder ``name`` (:data:`OCCLUDERS`) on every one, or clean for "clean"."""
    from occface.data import OcclusionSynthesizer

    count = len(base)
    if name == "clean":
        return VariantDataset(base, [(i, False) for i in range(count)])
    source, kind = OCCLUDERS[name]
    synthesizer = (OcclusionSynthesizer.from_directory(data / "occluders", [kind]) if source == "overlay" else
                   OcclusionSynthesizer([], [kind]))
    offset = sorted(OCCLUDERS).index(name) + 1  # each occluder its own draws
    return VariantDataset(base, [(i, kind) for i in range(count)], synthesizer, seed + offset)


def pair_sets(pair_set, occluded: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official pairs as indices into [clean images | occluded images]: clean pairs alone, or
    one face / both faces occluded."""
    count = len(pair_set.images)
    first, second = pair_set.pairs[:, 0], pair_set.pairs[:, 1]
    if not occluded:
        return {"": (np.stack([first, second], 1), np.full(len(first), "clean-clean"))}
    return {", one face": (np.stack([first, second + count], 1), np.full(len(first), "occluded-clean")),
            ", both faces": (np.stack([first + count, second + count], 1), np.full(len(first), "occluded-occluded"))}


def trained_kinds(config_kinds: list[str], occluders: bool) -> set[str]:
    """The conditions a model trained on: its config's occlusion kinds (overlays when it had them)."""
    names = set()
    for name, (source, kind) in OCCLUDERS.items():
        family = kind.split("/")[0]
        if source == "drawn" and (kind in config_kinds or family in config_kinds):
            names.add(name)
        if source == "overlay" and kind in config_kinds and occluders:
            names.add(name)
        if source == "procedural" and kind in config_kinds and not occluders:
            names.add(name)
    return names


def score_condition(model, features: Features, pairs: np.ndarray, types: np.ndarray, clean_pairs: np.ndarray | None,
                    issame: np.ndarray, folds, sources: tuple[str, ...]) -> tuple[dict, dict]:
    """({source: metrics}, {source: scores}) of one pair set; an occluded set is fused together
    with the clean pairs, as ``occface eval`` does for one occluder kind."""
    all_pairs = pairs if clean_pairs is None else np.concatenate([pairs, clean_pairs])
    if sources == ("embedding",):  # the untouched network and the baseline: no QAConv to score
        scores = {"embedding": embedding_scores(features, all_pairs)}
    else:
        scores = pair_scores(model, features, all_pairs, calibrated_fusion_weight(model))
    own = {s: scores[s][: len(pairs)] for s in sources}
    metrics = {s: m["all"] for s, m in evaluate_pairs(own, issame, types, folds).items()}
    return metrics, own


def cached_features(cache: Path | None, key: str, compute) -> Features:
    """Features from ``cache/key.pt`` when there, else computed and saved there (atomically)."""
    import torch

    if cache is None:
        return compute()
    path = cache / f"{key}.pt"
    if path.is_file():
        return Features(**torch.load(path, weights_only=True))
    features = compute()
    cache.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save({k: getattr(features, k) for k in ("embedding", "feature_map", "occlusion", "occluded")}, temporary)
    temporary.replace(path)
    return features


def pretrained(args: argparse.Namespace) -> int:
    from occface.models import ModelConfig, OccFaceModel, load_pretrained
    from occface.precision import describe_precision

    precision = args.precision  # auto: measured per kind of work (occface.precision)
    print(f"precision: {describe_precision(precision)}")
    started = time.perf_counter()
    training_precision = {"auto": "auto", "bf16": "bf16-mixed", "fp32": "32-true"}[precision]
    common = [*data_overrides(args.data), f"model.pretrained={args.pretrained}", f"train.seed={args.seed}",
              f"train.precision={training_precision}", "train.progress=true"]
    if args.steps:
        common.append(f"train.max_steps={args.steps}")
    if args.runtime == "onnx":
        common.append("loss.teacher_runtime=onnx")
    config_path = args.config or default_config_path("finetune_mobilefacenet.yaml")
    runs = {"full": [], "baseline": ["loss.adaface_weight=0", "loss.qaconv_weight=0", "loss.occlusion_weight=0",
                                     "loss.distill_map_weight=0", "loss.head_init=random"]}
    summaries = {}
    for name, extra in runs.items():
        if args.reuse_trained and (args.out / name / "model").is_dir():
            if args.recalibrate and name == "full":
                weights = recalibrate(args.out / name)["fusion_weight"]
                print(f"{name}: calibrated again on its validation pairs; fusion shares: "
                      f"{describe_fusion_weight(weights)}")
            continue
        config = load_config(config_path, [*common, *extra, *args.overrides, f"train.out_dir={args.out / name}"])
        summary = Trainer(config).fit()
        summaries[name] = {key: summary[key] for key in ("steps", "images_per_second", "seconds", "precision",
                                                          "channels_last")}
        print(f"{name}: {summary['steps']} steps, {summary['images_per_second']:.1f} images/s, {summary['seconds']:.0f} s "
              f"({summary['precision']}{', channels-last' if summary['channels_last'] else ''})")
    trained_seconds = time.perf_counter() - started

    untouched = OccFaceModel(ModelConfig(arch="mobilefacenet", feature_level="block3"))
    load_pretrained(untouched, args.pretrained)
    models = {"untouched": untouched,
              "baseline": OccFaceModel.from_pretrained(args.out / "baseline" / "model"),
              "full": OccFaceModel.from_pretrained(args.out / "full" / "model")}
    if args.runtime == "onnx":
        models = onnx_models(models, args.out)
    full_config = load_config(args.out / "full" / "config.yaml")
    trained = trained_kinds(full_config.data.occlusion_kinds, full_config.data.occluders is not None)
    conditions = args.conditions.split(",") if args.conditions else (
        ["clean", "niqab", "mask"] + (["procedural niqab", "procedural mask"] if args.held_out_occluders else []))
    unknown = [c for c in conditions if c != "clean" and c not in OCCLUDERS]
    if unknown:
        raise SystemExit(f"--conditions: unknown {unknown}; expected clean or some of {sorted(OCCLUDERS)}")
    pair_set, base = lfw_base(args.data, args.pairs)  # --pairs: a quick look at the first pairs
    issame, folds = pair_set.issame, pair_set.folds
    table, raw, speed, labels = {}, {}, {}, []
    import hashlib

    sha = file_sha256(args.pretrained)[:16]
    images_key = hashlib.sha256("\n".join(map(str, pair_set.images)).encode()).hexdigest()[:12]
    for name, model in models.items():
        tick, faces = time.perf_counter(), 0
        sources = ("embedding", "qaconv", "qaconv_weighted", "fused") if name == "full" else ("embedding",)
        keep = name == "full"

        def extract(condition: str, model=model, keep=keep) -> Features:
            dataset = occluder_dataset(args.data, base, condition, args.seed)
            return extract_features(model, dataset, 64, precision=precision, progress=True, keep_maps=keep)

        def features_of(condition: str, name=name) -> Features:
            if name != "untouched":
                return extract(condition)
            key = (f"untouched-{sha}-{args.runtime}-{condition.replace(' ', '_').replace('/', '-')}-seed{args.seed}"
                   f"-{len(base)}images-{images_key}")
            return cached_features(args.feature_cache, key, lambda: extract(condition))

        clean = features_of("clean")
        faces += len(base)
        for condition in conditions:
            occluded = condition != "clean"
            features = clean
            if occluded:
                features = concat_features([clean, features_of(condition)], [len(base), len(base)])
                faces += len(base)
            clean_pairs = pair_sets(pair_set, False)[""][0] if occluded else None
            for suffix, (pairs, types) in pair_sets(pair_set, occluded).items():
                where = "trained" if condition in trained else "held out"
                label = condition if not occluded else f"{condition}{suffix} ({where})"
                if label not in labels:
                    labels.append(label)
                metrics, scores = score_condition(model, features, pairs, types, clean_pairs, issame, folds, sources)
                for source in sources:
                    row = source if name == "full" else f"{name} embedding"
                    table.setdefault(row, {})[label] = metrics[source]
                    raw.setdefault(label, {})[row] = scores[source]
            del features
        speed[name] = faces / (time.perf_counter() - tick)
    comparisons = {}
    pairs_of = (("fused", "baseline embedding"), ("qaconv_weighted", "qaconv"), ("fused", "qaconv_weighted"),
                ("baseline embedding", "untouched embedding"))
    for condition, scores in raw.items():
        types = np.full(len(issame), "all")
        comparisons[condition] = {k: v["all"] for k, v in compare_sources(scores, issame, types, pairs_of).items()}
    result = {"seed": args.seed, "precision": describe_precision(precision),
              "runtime": "ONNX Runtime, fp32 (teacher, evaluation)" if args.runtime == "onnx" else "PyTorch",
              "training": summaries, "training_seconds": trained_seconds, "trained_occluders": sorted(trained),
              "evaluation_faces_per_second": speed, "accuracy": table, "comparisons": comparisons,
              "total_seconds": time.perf_counter() - started, "peak_rss_gib": peak_rss_gib()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrained.json").write_text(json.dumps(result, indent=2, default=float))
    print_tables(table, comparisons, labels)
    print("\nevaluation faces/s (two passes each, the image and its mirror): "
          + ", ".join(f"{k} {v:.0f}" for k, v in speed.items()))
    print(f"total {result['total_seconds']:.0f} s, peak resident memory {result['peak_rss_gib']:.1f} GiB; "
          f"results: {args.out / 'pretrained.json'}")
    return 0


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def onnx_models(models: dict, out: Path) -> dict:
    """The same networks in ONNX Runtime (fp32; each exported beside its model folder and checked
    against PyTorch by the export): a faster evaluation on CPUs, with the same QAConv and fusion."""
    from occface.export import export_onnx
    from occface.onnx_model import load_face_model

    exported = {}
    for name, model in models.items():
        folder = out / name / "model"
        if name == "untouched":
            model.save_pretrained(folder)
        export_onnx(folder)
        exported[name] = load_face_model(folder, "onnx")
    return exported


def print_tables(table: dict, comparisons: dict, conditions: list[str]) -> None:
    print("\nLFW, official pairs, 10-fold accuracy:\n")
    print("| source | " + " | ".join(conditions) + " |")
    print("|---|" + "---|" * len(conditions))
    for source, by_condition in table.items():
        print(f"| {source} | " + " | ".join(f"{100 * by_condition[c]['accuracy']:.1f}%" for c in conditions) + " |")
    print("\nROC AUC differences with 95% paired-bootstrap intervals:\n")
    names = list(next(iter(comparisons.values())))
    print("| comparison | " + " | ".join(conditions) + " |")
    print("|---|" + "---|" * len(conditions))
    for name in names:
        cells = []
        for condition in conditions:
            entry = comparisons[condition].get(name)
            cells.append("—" if entry is None else
                         f"{entry['auc_difference']:+.4f} [{entry['ci95'][0]:+.4f}, {entry['ci95'][1]:+.4f}]")
        print(f"| {name.replace('-vs-', ' − ')} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with cfp112/, faces112/, lfw112/, occluders/")
    parser.add_argument("--out", type=Path, default=Path("runs/niqab_lfw"))
    parser.add_argument("--pretrained", type=Path, default=None, help="pretrained MobileFaceNet weights")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--config", type=Path, default=None,
                        help="pretrained mode: the fine-tuning config (default: configs/finetune_mobilefacenet.yaml)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="training and evaluation precision in pretrained mode (auto: bf16 where it measures faster)")
    parser.add_argument("--runtime", default="torch", choices=("torch", "onnx"),
                        help="pretrained mode: where the frozen teacher (training) and the networks (evaluation) "
                             "run; onnx: ONNX Runtime, fp32, needs occface[onnx]")
    parser.add_argument("--held-out-occluders", action="store_true", help="also the procedural niqab and mask")
    parser.add_argument("--conditions", default=None,
                        help="pretrained mode: comma-separated occluders to evaluate (clean, niqab, mask, procedural "
                             "niqab, procedural mask, veil, facemask, veil/SUB); each is labelled trained or held out "
                             "by the full model's config (default: clean,niqab,mask [+ the procedural two])")
    parser.add_argument("--feature-cache", type=Path, default=None,
                        help="pretrained mode: keep the untouched network's LFW features here between runs")
    parser.add_argument("--pairs", type=int, default=None, help="evaluate only the first N pairs (a quick look)")
    parser.add_argument("--reuse-trained", action="store_true", help="skip training a model (full, baseline) already in --out")
    parser.add_argument("--recalibrate", action="store_true",
                        help="with --reuse-trained: calibrate the full model again (thresholds, fusion weights) with this "
                             "version's rules before evaluating it")
    parser.add_argument("overrides", nargs="*", help="further config overrides, section.key=value")
    args = parser.parse_args()
    if args.recalibrate and not args.reuse_trained:
        parser.error("--recalibrate needs --reuse-trained (a fresh run calibrates with this version's rules anyway)")
    missing = [name for name in NEEDED if not (args.data / name).exists()]
    if missing:
        print(f"{args.data}: {', '.join(missing)} not found; this benchmark needs the workplace's real face data",
              file=sys.stderr)
        return 2
    if args.pretrained is not None and not args.pretrained.is_file():
        print(f"{args.pretrained}: pretrained weights not found", file=sys.stderr)
        return 2
    return pretrained(args) if args.pretrained is not None else from_scratch(args)


if __name__ == "__main__":
    sys.exit(main())
