"""Training-step throughput (images/s) and the cost of the occlusion head + QAConv loss.

For each model it times full multi-task steps (AdaFace + QAConv pair loss + occlusion MSE,
forward, backward, SGD update) and AdaFace-only steps (backbone + margin head), on random
P x K batches, and prints the overhead of the two extra tasks.

    python benchmarks/train_bench.py                  # demo model (block4, block3), IR-50 block4, IR-50 block3 (CPU)
    python benchmarks/train_bench.py --only demo
    python benchmarks/train_bench.py --device cuda --batch 128
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from occface.config import load_config
from occface.losses import MarginHead
from occface.models.occface import ModelConfig, OccFaceModel
from occface.train import MultiTaskModule

MODELS = {
    "demo (ir_18 x0.25, block4)": dict(arch="ir_18", width=0.25, feature_level="block4", occlusion_hidden_channels=32),
    "demo (ir_18 x0.25, block3)": dict(arch="ir_18", width=0.25, feature_level="block3", occlusion_hidden_channels=32),
    "ir_50, block4 (7x7)": dict(arch="ir_50", width=1.0, feature_level="block4", occlusion_hidden_channels=128),
    "ir_50, block3 (14x14)": dict(arch="ir_50", width=1.0, feature_level="block3", occlusion_hidden_channels=128),
}


def time_steps(step, batch: int, device: torch.device, repeats: int) -> float:
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=48, help="images per step (P x K with K = 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--only", default="", help="time only the models whose name contains this text")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    config = load_config(None)
    print(f"device {device}, batch {args.batch}, torch threads {torch.get_num_threads()}")
    print(f"{'model':<30} {'full step img/s':>16} {'AdaFace-only img/s':>19} {'overhead':>9}")
    for name, spec in MODELS.items():
        if args.only not in name:
            continue
        torch.manual_seed(0)
        model = OccFaceModel(ModelConfig(**spec)).to(device)
        module = MultiTaskModule(model, args.classes, config).to(device).train()
        optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(args.batch, 3, 112, 112, device=device)
        labels = torch.arange(args.batch // 4, device=device).repeat_interleave(4)
        masks = torch.ones(args.batch, 1, 112, 112, device=device)
        masks[: args.batch // 2, :, 60:] = 0
        head: MarginHead = module.margin_head

        def full_step() -> None:
            with autocast:
                terms = module(images, labels, masks)
                loss = terms["adaface"] + terms["qaconv"] + terms["occlusion"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def adaface_step() -> None:
            with autocast:
                out = model.backbone(images)
                loss = F.cross_entropy(head(out.embedding, out.norm, labels).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        full = time_steps(full_step, args.batch, device, args.repeats)
        plain = time_steps(adaface_step, args.batch, device, args.repeats)
        print(f"{name:<30} {full:>16.1f} {plain:>19.1f} {plain / full - 1:>9.0%}")


if __name__ == "__main__":
    main()
