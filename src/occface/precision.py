"""Numeric precision: whether bf16 pays on this machine, and autocast for inference.

Without native bf16 (AVX2-only CPUs) bf16 is emulated and hundreds of times slower than fp32. With
it, whether bf16 is faster depends on the CPU *and* the work: on one 2-core Xeon with AVX-512 BF16
(no AMX) MobileFaceNet's inference ran twice as fast in bf16 while IR networks and QAConv's
matmuls ran slower. So ``"auto"`` decides by measuring:

* on CUDA: bf16;
* on a CPU without an ``avx512_bf16`` or ``amx_bf16`` flag: fp32, nothing measured;
* on a CPU with one: the work itself (a forward pass of the network on the first batch, a block of
  QAConv correlations, a training step's forward and backward) is timed in fp32 and in bf16, once
  per kind of work, batch size and machine, and bf16 is used where it is at least
  :data:`MIN_SPEEDUP` times faster (training: :data:`MIN_TRAINING_SPEEDUP`). Where no work is given
  to time, the CPU's flag decides. What was measured is kept in ``$OCCFACE_HOME/precision.json``
  under the CPU's model name and the torch version, so later processes on the machine read it
  instead of measuring again (``OCCFACE_PRECISION_REMEASURE=1`` measures anew).

Commands that decide (match, verify, search, eval, the service) default to fp32: thresholds are
calibrated in fp32, and bf16 moves a score by a few percent of its spread, so a decision would
otherwise depend on the CPU that made it.

What is thresholded or accumulated (embedding normalisation, scores, losses) stays fp32 whatever
the setting. ``OCCFACE_PRECISION`` (auto, fp32, bf16) overrides ``"auto"`` for a whole process.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_SPEEDUP = 1.15

MIN_TRAINING_SPEEDUP = 1.5  # bf16-mixed training costs reproducibility: it has to pay clearly

_measured: dict[Hashable, float] = {}
_CACHE_NAME = "precision.json"


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


def _seconds(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=1)
def machine_id() -> str:
    """The CPU's model name, core count and the torch version: what a measurement is valid for."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    return f"{name} | {os.cpu_count()} cores | torch {torch.__version__}"


def _cache_path() -> Path:
    return Path(os.environ.get("OCCFACE_HOME") or Path.home() / ".cache" / "occface") / _CACHE_NAME


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data.get(machine_id(), {}) if isinstance(data, dict) else {}


def _write_cache(key: str, speedup: float) -> None:
    """Add one measurement to the machine's cache file (atomically; a failure only costs a re-measure)."""
    path = _cache_path()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        data = data if isinstance(data, dict) else {}
        data.setdefault(machine_id(), {})[key] = round(speedup, 4)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data, indent=2))
        os.replace(temporary, path)
    except (OSError, ValueError) as error:
        log.debug("precision cache not written (%s)", error)


def bf16_speedup(key: Hashable, fp32_run: Callable[[], object], bf16_run: Callable[[], object],
                 repeats: int = 2) -> float:
    """How many times faster ``bf16_run`` is than ``fp32_run`` (best of ``repeats`` after a warm-up
    each), measured once per ``key`` and machine (kept in ``$OCCFACE_HOME/precision.json``)."""
    if key not in _measured:
        name = repr(key)
        cached = None if os.environ.get("OCCFACE_PRECISION_REMEASURE") else _read_cache().get(name)
        if cached is not None:
            _measured[key] = float(cached)
            return _measured[key]
        fp32_run(), bf16_run()  # warm-up: allocation and oneDNN's kernel choice
        _measured[key] = _seconds(fp32_run, repeats) / max(_seconds(bf16_run, repeats), 1e-9)
        log.info("precision auto for %s: bf16 runs at %.2fx the speed of fp32", key, _measured[key])
        _write_cache(name, _measured[key])
    return _measured[key]


def resolve_precision(precision: str, device: str | torch.device = "cpu", *, key: Hashable | None = None,
                      fp32_run: Callable[[], object] | None = None, bf16_run: Callable[[], object] | None = None,
                      min_speedup: float = MIN_SPEEDUP) -> str:
    """``"fp32"`` or ``"bf16"`` for a setting. ``"auto"``: bf16 on CUDA; fp32 on CPUs without native
    bf16; on CPUs with it, bf16 when the given work (``fp32_run`` / ``bf16_run``, measured once per
    ``key``) runs at least ``min_speedup`` times faster in bf16, or when no work is given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = os.environ.get("OCCFACE_PRECISION", "auto").strip().lower() or "auto"
        if precision not in PRECISIONS:
            raise ValueError(f"OCCFACE_PRECISION must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16"
    if not cpu_bf16_support()[0]:
        return "fp32"
    if key is None or fp32_run is None or bf16_run is None:
        return "bf16"
    return "bf16" if bf16_speedup(key, fp32_run, bf16_run) >= min_speedup else "fp32"


def network_precision(model: torch.nn.Module, sample: torch.Tensor, precision: str, key: Hashable,
                      device: str | torch.device = "cpu", backward: bool = False,
                      min_speedup: float = MIN_SPEEDUP) -> str:
    """:func:`resolve_precision` for running ``model`` on batches like ``sample`` [B, ...]: "auto"
    times its forward (with ``backward``, forward and backward of the sum of its float outputs) on
    ``sample`` itself in fp32 and in bf16 autocast, once per ``key`` and batch size. The batch size
    matters: one 2-core CPU ran MobileFaceNet 1.6x faster in bf16 at 64 faces and 0.95x at 32."""
    if not isinstance(model, torch.nn.Module):  # a network in another runtime (ONNX Runtime) runs in fp32
        return "fp32"

    def run(chosen: str) -> Callable[[], object]:
        def forward() -> object:
            if not backward:
                with torch.inference_mode(), autocast(chosen, device):
                    return model(sample)
            with torch.enable_grad():
                with autocast(chosen, device):
                    out = model(sample)
                tensors = [t for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t) and t.is_floating_point()]
                sum(t.float().mean() for t in tensors).backward()
            model.zero_grad(set_to_none=True)
        return forward

    return resolve_precision(precision, device, key=(*_as_tuple(key), len(sample)), fp32_run=run("fp32"),
                             bf16_run=run("bf16"), min_speedup=min_speedup)


def _as_tuple(key: Hashable) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def measured_speedups() -> dict[Hashable, float]:
    """What ``"auto"`` measured so far in this process: {key: bf16 speed over fp32}."""
    return dict(_measured)


def compute_dtype(precision: str, device: str | torch.device = "cpu", **measure) -> torch.dtype:
    """``torch.bfloat16`` where :func:`resolve_precision` gives bf16, else ``torch.float32``."""
    return torch.bfloat16 if resolve_precision(precision, device, **measure) == "bf16" else torch.float32


def describe_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """For reports: the setting, the CPU's capability and what ``"auto"`` measured so far."""
    if torch.device(device).type != "cpu":
        return f"{resolve_precision(precision, device)} ({precision}; {torch.device(device).type})"
    native, reason = cpu_bf16_support()
    text = f"{precision}; {'native bf16' if native else 'no native bf16'}: {reason}"
    if precision == "auto" and native:
        measured = [f"{' '.join(map(str, _as_tuple(key)))}: bf16 {speedup:.2f}x" for key, speedup in _measured.items()]
        text += "; measured " + (", ".join(measured) if measured else "nothing yet")
    return text


def check_cpu_bf16(dtype: torch.dtype, device: str | torch.device, what: str) -> None:
    """Refuse bf16 compute on a CPU without native bf16 (hundreds of times slower than fp32 there)."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_bf16_support()[0]:
        raise ValueError(f"{what}: bf16 on this CPU would be emulated, hundreds of times slower than fp32 "
                         f"({cpu_bf16_support()[1]}); use precision 'auto' or 'fp32'")


def autocast(precision: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """A bf16 autocast context for ``"bf16"`` (resolve ``"auto"`` first), else a no-op."""
    if precision == "bf16" or (precision == "auto" and resolve_precision(precision, device) == "bf16"):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
