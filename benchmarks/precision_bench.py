"""fp32 against bf16 on this machine, and what precision "auto" picks: backbone inference, QAConv
scoring, training steps, and (with --lfw-model) LFW accuracy of every score source.

"auto" is fp32 on a CPU without native bf16 (nothing is measured, bf16 is not run: the bf16 column
shows "—"); on one with it, bf16 wherever it measures faster (:mod:`occface.precision`). Printed: the
CPU's capability, then

- backbone inference (the forward ``extract_features`` runs, batch 64, channels-last faces): faces/s for IR-18, IR-50 and
  MobileFaceNet, each with its 14x14 map;
- QAConv ``score_all`` (64 probes x 512 gallery faces, visibility-weighted): pairs/s at 7x7x512,
  14x14x256 and 14x14x128;
- a training step of ``configs/demo_cpu.yaml`` and of ``configs/finetune_mobilefacenet.yaml``
  (48 random faces, every loss term of the config, the optimiser step, in the memory layout the
  Trainer uses on the CPU): images/s.

- with ``--lfw-model DIR --data DIR``: ``occface eval`` of that model on LFW's official pairs, clean
  and with a niqab on one / both faces, in fp32 and in bf16, and the accuracy of each source in both.

    python benchmarks/precision_bench.py [--repeats 3] [--only qaconv]
    python benchmarks/precision_bench.py --only lfw --lfw-model runs/niqab_lfw_pretrained/full/model --data ../shared/data
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from occface.config import load_config
from occface.demo import default_config_path
from occface.models import ModelConfig, OccFaceModel
from occface.objective import MultiTaskModule, build_model
from occface.scoring import matcher_dtype, network_input, network_key
from occface.precision import autocast, cpu_bf16_support, network_precision
from occface.train import cpu_training_pays_bf16, training_memory_format

NATIVE = cpu_bf16_support()[0]


def rate(step: Callable[[], None], items: int, repeats: int) -> float:
    step()  # warm-up (and oneDNN's kernel choice)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return items * repeats / (time.perf_counter() - start)


def row(name: str, fp32: float, bf16: float | None, unit: str, auto: str) -> None:
    if bf16 is None:
        print(f"| {name} | {fp32:,.0f} {unit} | — | — | {auto} |")
    else:
        print(f"| {name} | {fp32:,.0f} {unit} | {bf16:,.0f} {unit} | {bf16 / fp32:.2f}x | {auto} |")


def header(title: str) -> None:
    print(f"\n| {title} | fp32 | bf16 | bf16 / fp32 | auto picks |\n|---|---|---|---|---|")


def backbones(repeats: int) -> None:
    header("backbone inference (batch 64)")
    images = network_input(torch.rand(64, 3, 112, 112))  # channels-last, as extract_features hands them over
    for arch in ("ir_18", "ir_50", "mobilefacenet"):
        torch.manual_seed(0)
        model = OccFaceModel(ModelConfig(arch=arch, feature_level="block3")).eval()
        speeds = []
        for precision in ("fp32", "bf16") if NATIVE else ("fp32",):
            def step() -> None:
                with torch.inference_mode(), autocast(precision):
                    out = model(images)
                    model.fused_embedding(images, out)
            speeds.append(rate(step, 64, repeats))
        auto = network_precision(model, images, "auto", network_key(model))
        row(f"{arch} (flip-and-norm: two passes)", speeds[0], speeds[1] if NATIVE else None, "faces/s", auto)


def qaconv(repeats: int) -> None:
    from occface.models.qaconv import QAConv

    header("QAConv score_all (64 x 512, weighted)")
    for channels, side in ((512, 7), (256, 14), (128, 14)):
        torch.manual_seed(0)
        matcher = QAConv(channels, side, side).eval()
        probe, gallery = torch.randn(64, channels, side, side), torch.randn(512, channels, side, side)
        probe_occ, gallery_occ = torch.rand(64, 1, side, side), torch.rand(512, 1, side, side)
        speeds = []
        for dtype in (torch.float32, torch.bfloat16) if NATIVE else (torch.float32,):
            speeds.append(rate(lambda: matcher.score_all(probe, gallery, probe_occ, gallery_occ, dtype=dtype),
                               64 * 512, repeats))
        auto = "bf16" if matcher_dtype(matcher, gallery, "auto") == torch.bfloat16 else "fp32"
        row(f"{side}x{side}x{channels}", speeds[0], speeds[1] if NATIVE else None, "pairs/s", auto)


def training(repeats: int) -> None:
    header("training step (48 faces)")
    with tempfile.TemporaryDirectory() as folder:
        # Random MobileFaceNet weights stand in for the pretrained file: the timing is the same.
        weights = Path(folder) / "mobilefacenet.pt"
        torch.save(OccFaceModel(ModelConfig(arch="mobilefacenet")).backbone.state_dict(), weights)
        for name, overrides in (("demo_cpu.yaml", []), ("finetune_mobilefacenet.yaml", [f"model.pretrained={weights}"])):
            config = load_config(default_config_path(name), overrides)
            speeds = []
            for precision in ("fp32", "bf16") if NATIVE else ("fp32",):
                torch.manual_seed(0)
                model, teacher = build_model(config)
                module = MultiTaskModule(model, 100, config, teacher).train()
                if config.model.train_from:
                    module.freeze_backbone_before(config.model.train_from)
                optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
                images, masks = torch.rand(48, 3, 112, 112), torch.ones(48, 1, 112, 112)
                masks[:24, :, 60:] = 0
                layout = training_memory_format(module)  # the Trainer's layout on the CPU
                module.to(memory_format=layout)
                images = images.contiguous(memory_format=layout)
                labels = torch.arange(12).repeat_interleave(4)
                clean = images.clone() if teacher is not None else None
                weights_of = {"adaface": config.loss.adaface_weight, "qaconv": config.loss.qaconv_weight,
                              "occlusion": config.loss.occlusion_weight, "distill": config.loss.distill_weight,
                              "distill_map": config.loss.distill_map_weight}

                def step() -> None:
                    with autocast(precision):
                        terms = module(images, labels, masks, clean)
                    loss = sum(w * terms[k].float() for k, w in weights_of.items() if w and k in terms)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                speeds.append(rate(step, 48, repeats))
            auto = "bf16-mixed" if cpu_training_pays_bf16(config) else "32-true"
            row(name, speeds[0], speeds[1] if NATIVE else None, "images/s", auto)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("backbones", "qaconv", "training", "lfw"), default=None)
    parser.add_argument("--lfw-model", type=Path, default=None, help="occface model folder for the LFW comparison")
    parser.add_argument("--data", type=Path, default=None, help="folder with lfw112/, lfw112_pairs.txt, occluders/")
    args = parser.parse_args()
    native, reason = cpu_bf16_support()
    print(f"CPU: native bf16 {native} ({reason}); torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores")
    for part in (backbones, qaconv, training):
        if args.only in (None, part.__name__):
            part(args.repeats)
    if args.lfw_model is not None and args.only in (None, "lfw"):
        lfw(args.lfw_model, args.data)


def lfw(model: Path, data: Path | None) -> None:
    from occface.evaluate import run_eval

    if data is None or not (data / "lfw112_pairs.txt").is_file():
        print(f"\nLFW comparison skipped: {data}/lfw112_pairs.txt not found (--data)")
        return
    if not NATIVE:
        print("\nLFW comparison skipped: no native bf16 on this CPU")
        return
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for precision in ("fp32", "bf16"):
            start = time.perf_counter()
            results[precision] = run_eval(model, Path(out) / precision, pairs_file=data / "lfw112_pairs.txt",
                                          root=data / "lfw112", occlude=["none", "niqab:probe", "niqab:both"],
                                          occluders=data / "occluders", precision=precision, progress=False)
            print(f"{precision}: {time.perf_counter() - start:.0f} s")
    types = ("clean-clean", "occluded-clean", "occluded-occluded")
    print(f"\nLFW official pairs, {model}: 10-fold accuracy fp32 / bf16 (difference)\n")
    print("| source | " + " | ".join(types) + " |\n|---|" + "---|" * len(types))
    for source in ("embedding", "qaconv", "qaconv_weighted", "fused"):
        cells = []
        for kind in types:
            a, b = (100 * results[p][source][kind]["accuracy"] for p in ("fp32", "bf16"))
            cells.append(f"{a:.2f} / {b:.2f} ({b - a:+.2f})")
        print(f"| {source} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
