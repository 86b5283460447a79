"""Faces per second of the network (backbone + occlusion head, one forward, no flip), eager PyTorch
against ONNX Runtime, at batch 1 and 64, per backbone (width 1, block-3 maps, 112x112 faces).

Rows: eager PyTorch fp32 on contiguous faces, on channels-last faces (what ``--runtime torch
--precision fp32`` runs), with channels-last weights too, eager bf16 autocast (only on a CPU with native bf16), and ONNX Runtime (the graph ``occface
export`` writes, through :class:`occface.onnx_model.OnnxFaceModel`) at each graph optimisation level
and with 1 and with all threads. Also printed: the largest output difference of each graph.

    python benchmarks/onnx_bench.py [--arch ir_18 ir_50 mobilefacenet] [--seconds 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import torch

from occface.export import export_onnx
from occface.models import ModelConfig, OccFaceModel, measure_batchnorm
from occface.onnx_model import OPTIMIZATIONS, OnnxFaceModel
from occface.precision import cpu_bf16_support
from occface.scoring import network_input


def faces_per_second(run: Callable[[], object], batch: int, seconds: float) -> float:
    run()  # warm-up: allocation, oneDNN's and ONNX Runtime's kernel choice
    count, start = 0, time.perf_counter()
    while True:
        run()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and count >= 2:
            return batch * count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["ir_18", "ir_50", "mobilefacenet"])
    parser.add_argument("--level", default="block3", choices=("block3", "block4"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()
    cores = os.cpu_count()
    native, reason = cpu_bf16_support()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cores} cores; bf16: {reason}")
    print("\n| backbone | batch | runtime | faces/s | vs eager fp32 |\n|---|---|---|---|---|")
    for arch in args.arch:
        torch.manual_seed(0)
        # batch-norm statistics of random faces: a trained network's activation scale, its kernels' speed
        model = measure_batchnorm(OccFaceModel(ModelConfig(arch=arch, feature_level=args.level)), torch.rand(32, 3, 112, 112))
        with tempfile.TemporaryDirectory() as folder:
            model_dir = model.save_pretrained(folder)
            exported = export_onnx(model_dir)
            graphs = {(level, threads): OnnxFaceModel(model_dir, threads=threads, optimization=level)
                      for level in OPTIMIZATIONS for threads in sorted({1, cores})}
            for batch in args.batches:
                faces = torch.rand(batch, 3, 112, 112)
                rows: dict[str, float] = {}
                with torch.inference_mode():
                    rows["eager fp32"] = faces_per_second(lambda: model(faces), batch, args.seconds)
                    faces_cl = network_input(faces)  # channels-last faces, as occface's PyTorch runtime runs
                    rows["eager fp32, channels-last input"] = faces_per_second(lambda: model(faces_cl), batch, args.seconds)
                    last = model.to(memory_format=torch.channels_last)
                    rows["eager fp32, channels-last input and weights"] = faces_per_second(lambda: last(faces_cl), batch,
                                                                                          args.seconds)
                    model.to(memory_format=torch.contiguous_format)
                    if native:
                        def bf16() -> object:
                            with torch.autocast("cpu", dtype=torch.bfloat16):
                                return model(faces)
                        rows["eager bf16 autocast"] = faces_per_second(bf16, batch, args.seconds)
                for (level, threads), graph in graphs.items():
                    rows[f"ONNX Runtime, {level}, {threads} thread{'s' if threads > 1 else ''}"] = faces_per_second(
                        lambda graph=graph: graph(faces), batch, args.seconds)
                base = rows["eager fp32"]
                for name, value in rows.items():
                    print(f"| {arch} | {batch} | {name} | {value:,.1f} | {value / base:.2f}x |", flush=True)
        worst = max(exported.max_difference.values())
        print(f"| {arch} | | graph {exported.bytes / 1e6:.1f} MB, largest difference {worst:.1e} | | |")


if __name__ == "__main__":
    main()
