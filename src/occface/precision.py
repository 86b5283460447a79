"""Numeric precision: whether this CPU computes bf16 natively, and autocast for inference.

Without native bf16 (AVX2-only CPUs) bf16 matmuls are emulated and hundreds of times slower than
fp32; with AVX-512 BF16 or AMX they are several times faster. ``"auto"`` therefore means bf16 on
GPUs and on CPUs that report native bf16, fp32 elsewhere. What is thresholded or accumulated
(embedding normalisation, scores, losses) stays fp32 whatever the setting.
"""
from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16?, how that was decided), from the CPU flags the OS reports (Linux) or the
    architecture (Apple silicon has bf16 arithmetic)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = set()
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
                break
        found = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
        if found:
            return True, f"CPU flags {', '.join(found)}"
        return False, "no avx512_bf16 or amx_bf16 CPU flag"
    if platform.machine() == "arm64" and platform.system() == "Darwin":
        return True, "Apple silicon"
    return False, "CPU capability unknown"


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``"auto"`` -> ``"bf16"`` on CUDA and on CPUs with native bf16, else ``"fp32"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16"
    return "bf16" if cpu_bf16_support()[0] else "fp32"


def autocast(precision: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """A bf16 autocast context for ``"bf16"`` (after :func:`resolve_precision`), else a no-op."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
