"""``occface serve`` under load: concurrent verify requests and searches of a 100k-face gallery.

Starts the real server (``occface serve``, uvicorn, one process) on a free loopback port with a
gallery of ``--faces`` synthetic faces (random features of the model's shapes, as
``search_scale.py`` makes them, plus their database rows), then from this process:

1. ``--verify`` verify requests, ``--concurrency`` at a time (200 by default: all at once), each two
   aligned LFW faces (``--photos``: the same faces pasted into 640x480 scenes, so each request also
   detects and aligns two faces);
2. ``--searches`` searches of the gallery, ``--search-concurrency`` at a time, each an aligned LFW face.

Per phase: requests, errors (any answer but 2xx, or none: a lost request), requests/s, latency p50
and p95, and the server's resident memory (VmRSS now, VmHWM its peak).

    python benchmarks/service_load.py --data ../shared/data --model runs/niqab_lfw_pretrained/full/model
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def memory_gib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, GiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 2**20
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def synthetic_gallery(path: Path, model_dir: Path, faces: int, shard: int = 10_000) -> float:
    """A gallery of random features (and its database rows, added when the server starts)."""
    from search_scale import random_features

    from occface.galleries import Entry, Gallery
    from occface.models import OccFaceModel

    import torch

    model = OccFaceModel.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        out = model(torch.rand(1, 3, model.config.input_size, model.config.input_size))
    gallery = Gallery.create(path, model, model_dir)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for first in range(0, faces, shard):
        count = min(shard, faces - first)
        entries = [Entry(f"person{(first + i) // 2}", f"random:{first + i}", f"random-{first + i}")
                   for i in range(count)]
        gallery.add(entries, random_features(count, out.embedding.shape[1], tuple(out.feature_map.shape[1:]), rng))
    return time.perf_counter() - started


def run_phase(name: str, requests: list, concurrency: int, pid: int) -> dict:
    """Send ``requests`` ((method, url, kwargs)) ``concurrency`` at a time; the phase's figures."""
    import httpx

    latencies, failures = [], []
    client = httpx.Client(timeout=600.0, limits=httpx.Limits(max_connections=concurrency + 4))

    def one(request) -> None:
        method, url, kwargs = request
        tick = time.perf_counter()
        try:
            response = client.request(method, url, **kwargs)
            if response.status_code >= 300:
                failures.append(f"{response.status_code} {response.text[:160]}")
        except httpx.HTTPError as error:
            failures.append(f"no answer: {error!r}")
        latencies.append(time.perf_counter() - tick)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, requests))
    seconds = time.perf_counter() - started
    client.close()
    rss, peak = memory_gib(pid)
    p50, p95 = np.percentile(latencies, [50, 95]) * 1000
    return {"phase": name, "requests": len(requests), "answered": len(latencies), "errors": len(failures),
            "first_errors": failures[:3], "seconds": seconds, "per_second": len(requests) / seconds,
            "p50_ms": p50, "p95_ms": p95, "rss_gib": rss, "peak_gib": peak}


def encoded(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with lfw112/ and lfw112_pairs.txt")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--faces", type=int, default=100_000, help="synthetic gallery faces")
    parser.add_argument("--verify", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--searches", type=int, default=1000)
    parser.add_argument("--search-concurrency", type=int, default=8)
    parser.add_argument("--photos", action="store_true", help="verify photos (detection and alignment included)")
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--work", type=Path, default=None, help="folder for the gallery (default: a temporary one)")
    args = parser.parse_args()
    from align_bench import paste

    from occface.data import read_pairs_txt
    from occface.data.images import read_image

    work = Path(tempfile.mkdtemp(prefix="occface-load-", dir=args.work))
    try:
        built = synthetic_gallery(work / "gallery", args.model, args.faces)
        print(f"gallery: {args.faces:,} synthetic faces written in {built:.0f} s")
        pairs = read_pairs_txt(args.data / "lfw112_pairs.txt", args.data / "lfw112")
        rng = np.random.default_rng(0)
        faces = [read_image(pairs.images[i]) for i in range(min(400, len(pairs.images)))]
        if args.photos:
            faces = [paste(face, rng)[0] for face in faces]
        blobs = [encoded(face) for face in faces]
        port = free_port()
        command = [sys.executable, "-m", "occface.cli", "serve", "--model", str(args.model), "--gallery",
                   str(work / "gallery"), "--port", str(port), "--workers", str(args.workers), "--timeout", "600"]
        started = time.perf_counter()
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        import httpx

        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                print(server.stdout.read())
                return 1
            time.sleep(0.5)
        print(f"server up in {time.perf_counter() - started:.1f} s (database rows for the gallery included): "
              f"{' '.join(command[2:])}")
        verify = [("POST", base + "/v1/verify", {"files": {"first": ("a.png", blobs[(2 * k) % len(blobs)]),
                                                           "second": ("b.png", blobs[(2 * k + 1) % len(blobs)])}})
                  for k in range(args.verify)]
        search = [("POST", base + "/v1/search", {"files": {"image": ("q.png", blobs[k % len(blobs)])}})
                  for k in range(args.searches)]
        results = [run_phase(f"verify ({'photos' if args.photos else 'aligned faces'}), {args.concurrency} at a time",
                             verify, args.concurrency, server.pid),
                   run_phase(f"search of {args.faces:,} faces, {args.search_concurrency} at a time", search,
                             args.search_concurrency, server.pid)]
        server.terminate()
        server.wait(timeout=60)
        print("\n| phase | requests | errors or lost | requests/s | p50 | p95 | server resident (now / peak) |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['phase']} | {r['requests']} | {r['errors'] + r['requests'] - r['answered']} | "
                  f"{r['per_second']:.1f} | {r['p50_ms']:.0f} ms | {r['p95_ms']:.0f} ms | "
                  f"{r['rss_gib']:.2f} / {r['peak_gib']:.2f} GiB |")
            for error in r["first_errors"]:
                print(f"    error: {error}")
        return 0 if all(r["errors"] == 0 and r["answered"] == r["requests"] for r in results) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
