"""All-pairs QAConv scoring throughput and memory.

Cases (random unit features; scores do not depend on the values, only the shapes):
  * 7x7x512,    1,000 probes x 1,000 gallery   (block-4 maps)
  * 14x14x256,    300 probes x   300 gallery   (block-3 maps: 16x the work per pair)
  * 7x7x512,       16 probes x 50,000 gallery  (memory case: the gallery is streamed in chunks)
each with and without occlusion maps, next to two straightforward formulations (one einsum over
a chunk; conv2d with probe locations as 1x1 kernels, as QAConv's reference code does) and the
fp32 matmul peak measured in the same run. Work per pair is 2*C*HW^2 FLOPs.

Memory: "peak MiB" is the whole process's peak resident set during a case (``VmHWM``, reset
before each case; on CUDA ``torch.cuda.max_memory_allocated``), "work MiB" that peak minus what
was in use when the case began (the scorer's working memory on top of its inputs; memory freed
by an earlier case and reused shows as 0).

    python benchmarks/qaconv_bench.py                 # CPU, fp32, all cases
    python benchmarks/qaconv_bench.py --device cuda --dtype float16

On CUDA each case is timed over 10 repetitions; cuDNN's conv2d may use TF32 in the fp32 runs
(PyTorch's default), so its fp32 figures can exceed the plain fp32 matmul peak.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from occface.models import QAConv


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size**3 / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Working memory of a block of code: peak RSS (or CUDA allocation) above the level at entry."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")  # working memory: peak above the level at entry
        self.peak_mib = float("nan")  # the process's whole peak (RSS) or all CUDA allocations

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._status("VmHWM")
        self.mib = (peak - self.start) / 2**20
        self.peak_mib = peak / 2**20


def einsum_scores(qaconv: QAConv, probe, gallery, probe_occ, gallery_occ, chunk_elements: int) -> torch.Tensor:
    """Straightforward formulation 1: one einsum per probe chunk against the whole gallery."""
    a = qaconv.prepare(probe, probe_occ).transpose(1, 2)  # [P, C, HW]
    b = qaconv.prepare(gallery, gallery_occ).transpose(1, 2)  # [G, C, HW]
    weight, _, bias = qaconv._eval_affine()  # visibility_fc is zero in a fresh matcher
    hw = qaconv.num_locations
    step = max(1, chunk_elements // (b.shape[0] * hw * hw))
    out = []
    for start in range(0, a.shape[0], step):
        corr = torch.einsum("pci,gcj->pgij", a[start : start + step], b)
        maxima = torch.cat((corr.amax(dim=2), corr.amax(dim=3)), dim=2).float()
        out.append(maxima @ weight + bias)
    return torch.cat(out)


def conv2d_scores(qaconv: QAConv, probe, gallery, probe_occ, gallery_occ, chunk_elements: int) -> torch.Tensor:
    """Straightforward formulation 2: probe locations as 1x1 conv kernels over gallery maps."""
    num_probe, channels, h, w = probe.shape
    hw = h * w
    a = qaconv.prepare(probe, probe_occ)  # [P, HW, C]
    b = qaconv.prepare(gallery, gallery_occ).transpose(1, 2).reshape(-1, channels, h, w)  # [G, C, H, W]
    weight, _, bias = qaconv._eval_affine()  # visibility_fc is zero in a fresh matcher
    probe_step = min(num_probe, 64)
    gallery_step = max(1, chunk_elements // (probe_step * hw * hw))
    out = torch.empty(num_probe, b.shape[0], device=probe.device)
    for p0 in range(0, num_probe, probe_step):
        kernel = a[p0 : p0 + probe_step].reshape(-1, channels, 1, 1)
        for g0 in range(0, b.shape[0], gallery_step):
            corr = F.conv2d(b[g0 : g0 + gallery_step], kernel)  # [g, p*HW(probe), H, W(gallery)]
            corr = corr.view(corr.shape[0], -1, hw, hw)
            maxima = torch.cat((corr.amax(dim=2), corr.amax(dim=3)), dim=2).float()
            out[p0 : p0 + probe_step, g0 : g0 + gallery_step] = (maxima @ weight + bias).T
    return out


def run_case(name, qaconv, probe, gallery, probe_occ, gallery_occ, device, dtype, peak, baselines, subset):
    flops_per_pair = 2 * qaconv.num_features * qaconv.num_locations**2
    rows = []
    kinds = [("occface score_all", lambda p, g, po, go: qaconv.score_all(p, g, po, go, dtype=dtype))]
    if baselines:
        chunk = 1 << 25  # a 128 MiB fp32 correlation chunk: what a plain implementation picks
        kinds += [
            ("einsum (chunked)", lambda p, g, po, go: einsum_scores(qaconv, p, g, po, go, chunk)),
            ("conv2d (reference style)", lambda p, g, po, go: conv2d_scores(qaconv, p, g, po, go, chunk)),
        ]
    reference = None
    for kind, score in kinds:
        p, po = probe, probe_occ
        if kind != "occface score_all" and subset < probe.shape[0]:
            p, po = probe[:subset], None if probe_occ is None else probe_occ[:subset]
        with torch.inference_mode():
            score(p[:2], gallery[:8], None if po is None else po[:2], None if gallery_occ is None else gallery_occ[:8])
        repeats = 10 if device.type == "cuda" else 1  # GPU cases take milliseconds: average several
        with PeakMemory(device) as memory:
            sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                for _ in range(repeats):
                    scores = score(p, gallery, po, gallery_occ)
            sync(device)
            seconds = (time.perf_counter() - start) / repeats
        if reference is None:
            reference = scores
        else:
            diff = (scores - reference[: scores.shape[0]]).abs().max().item()
            assert diff < 1e-2, f"{kind} disagrees with score_all by {diff}"
        pairs = scores.numel()
        gflops = pairs * flops_per_pair / seconds / 1e9
        rows.append((name, kind, pairs, seconds, pairs / seconds, gflops, gflops / peak, memory.mib, memory.peak_mib))
    return rows


def streamed_case(qaconv, device, dtype, peak, num_probe=16, num_gallery=50_000, pool=2_000, chunk=1_000):
    """16 probes against 50,000 gallery faces streamed in chunks of 1,000 (the stream cycles a pool
    of 2,000 random maps, so only one chunk of the gallery is ever resident)."""
    probe = torch.randn(num_probe, 512, 7, 7, device=device)
    pool_maps = torch.randn(pool, 512, 7, 7)
    flops_per_pair = 2 * qaconv.num_features * qaconv.num_locations**2
    stream = (pool_maps[(i * chunk) % pool : (i * chunk) % pool + chunk] for i in range(num_gallery // chunk))
    with PeakMemory(device) as memory:
        sync(device)
        start = time.perf_counter()
        scores = qaconv.score_all(probe, stream, dtype=dtype, device=device)
        sync(device)
        seconds = time.perf_counter() - start
    assert scores.shape == (num_probe, num_gallery)
    pairs = scores.numel()
    gflops = pairs * flops_per_pair / seconds / 1e9
    return [("7x7x512 16x50k streamed", "occface score_all", pairs, seconds, pairs / seconds, gflops, gflops / peak,
             memory.mib, memory.peak_mib)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--no-baselines", action="store_true", help="skip the einsum and conv2d formulations")
    parser.add_argument("--baseline-probes", type=int, default=250,
                        help="probes the baselines score at 7x7 (all gallery faces), to keep each case under a minute")
    parser.add_argument("--cases", default="7x7,14x14,stream")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    peak = matmul_peak_gflops(device, dtype)
    print(f"device {device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}")
    print(f"matmul peak ({args.dtype}, 2048^3, best of 3): {peak:.1f} GFLOP/s\n")

    rows = []
    cases = args.cases.split(",")
    for label, channels, side, n_probe, n_gallery, subset in (
        ("7x7", 512, 7, 1000, 1000, args.baseline_probes),
        ("14x14", 256, 14, 300, 300, 300),
    ):
        if label not in cases:
            continue
        qaconv = QAConv(channels, side, side).to(device).eval()
        probe = torch.randn(n_probe, channels, side, side, device=device)
        gallery = torch.randn(n_gallery, channels, side, side, device=device)
        probe_occ = torch.rand(n_probe, 1, side, side, device=device)
        gallery_occ = torch.rand(n_gallery, 1, side, side, device=device)
        for weighted in (False, True):
            name = f"{label}x{channels} {n_probe}x{n_gallery}" + (" weighted" if weighted else "")
            rows += run_case(
                name, qaconv, probe, gallery, probe_occ if weighted else None, gallery_occ if weighted else None,
                device, dtype, peak, not args.no_baselines, subset,
            )
    if "stream" in cases:
        rows += streamed_case(QAConv(512, 7, 7).to(device).eval(), device, dtype, peak)

    header = f"{'case':<30} {'implementation':<26} {'pairs':>9} {'s':>7} {'pairs/s':>10} {'GFLOP/s':>8} {'of peak':>8} {'work MiB':>9} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for name, kind, pairs, seconds, rate, gflops, fraction, mib, peak_mib in rows:
        print(f"{name:<30} {kind:<26} {pairs:>9,} {seconds:>7.2f} {rate:>10,.0f} {gflops:>8.1f} {fraction:>8.0%}"
              f" {mib:>9.0f} {peak_mib:>9.0f}")
    print("\nwork MiB: peak above the memory in use when the case started (inputs excluded);"
          " peak MiB: the whole process's peak (CPU: resident set, including torch and the inputs).")


if __name__ == "__main__":
    main()
