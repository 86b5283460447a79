"""How search scales: galleries of 10k to 1M faces with random features of a model's shapes.

For each size (the gallery grows from one to the next): the rate of appending faces (random
features written as shards: fp32 embeddings, fp16 maps and visibility), the time to build the FAISS
index, the latency of one query (FAISS shortlist of 100, QAConv plain and weighted on the shortlist's
maps read from disk, fusion), p50 / p95 over the queries, and the resident memory of the searching
process (a fresh one, as a service would be; the random features are made in another): what it
allocated (RssAnon) and its mapped file pages (RssFile: shared libraries; the gallery's rows are
read with pread, not mapped). Disk: C*H*W*2 bytes a face for the maps (MobileFaceNet block 3: 50 KB;
1M faces: 50 GB).

    python benchmarks/search_scale.py --model runs/niqab_lfw_pretrained/full/model --sizes 10000,100000,1000000 \\
        --out /big/disk/scale.gallery
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch


def rss_gb(kind: str = "VmRSS") -> float:
    """Resident memory in GB: ``VmRSS`` (all), ``RssAnon`` (what the process allocated) or
    ``RssFile`` (mapped file pages: shared libraries, anything memory-mapped)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def random_features(count: int, embedding: int, map_shape: tuple[int, int, int], rng: np.random.Generator):
    from occface.scoring import Features

    vectors = rng.standard_normal((count, embedding), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    maps = rng.standard_normal((count, *map_shape), dtype=np.float32).astype(np.float16)
    visibility = rng.random((count, 1, *map_shape[1:]), dtype=np.float32).astype(np.float16)
    return Features(torch.from_numpy(vectors), torch.from_numpy(maps), torch.from_numpy(visibility),
                    torch.zeros(count, dtype=torch.bool))


def append(path: str, model_dir: str, start: int, stop: int, shard: int, embedding: int,
           map_shape: tuple[int, int, int]) -> float:
    """Append faces start..stop-1 with random features (in a worker process, so that generating them
    leaves the measuring process's memory alone); returns faces/s."""
    from occface.gallery import Entry, Gallery

    gallery = Gallery.open(path, load_model=False)
    rng = np.random.default_rng(start)
    started = time.perf_counter()
    for first in range(start, stop, shard):
        count = min(shard, stop - first)
        entries = [Entry(f"person{first + i}", f"random:{first + i}", f"random-{first + i}") for i in range(count)]
        gallery.add(entries, random_features(count, embedding, map_shape, rng))
    return (stop - start) / (time.perf_counter() - started)


def measure(path: str, queries: int, embedding: int, map_shape: tuple[int, int, int]) -> tuple[float, ...]:
    """In a fresh process, as a search service would: (index build seconds, query p50 and p95 in ms,
    anonymous and file-backed resident memory in GB after the queries)."""
    from occface.gallery import Gallery

    gallery = Gallery.open(path)
    probes = random_features(queries, embedding, map_shape, np.random.default_rng(1))
    started = time.perf_counter()
    gallery.index()
    build = time.perf_counter() - started
    latencies = []
    for q in range(queries):
        one = type(probes)(probes.embedding[q:q + 1], probes.feature_map[q:q + 1].float(),
                           probes.occlusion[q:q + 1].float(), probes.occluded[q:q + 1])
        tick = time.perf_counter()
        gallery.search_features(one, [f"q{q}"], top=10, shortlist=100)
        latencies.append(time.perf_counter() - tick)
    p50, p95 = np.percentile(latencies, [50, 95]) * 1000
    return build, float(p50), float(p95), rss_gb("RssAnon"), rss_gb("RssFile")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="occface model folder (shapes and calibration)")
    parser.add_argument("--sizes", default="10000,100000", help="gallery sizes, ascending")
    parser.add_argument("--out", type=Path, default=Path("scale.gallery"), help="gallery folder (removed first)")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--shard", type=int, default=10_000, help="faces a shard")
    parser.add_argument("--keep", action="store_true", help="keep the gallery afterwards")
    args = parser.parse_args()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from occface.gallery import Gallery
    from occface.models import OccFaceModel

    model = OccFaceModel.from_pretrained(args.model).eval()
    with torch.inference_mode():
        out = model(torch.rand(1, 3, model.config.input_size, model.config.input_size))
    embedding, map_shape = out.embedding.shape[1], tuple(out.feature_map.shape[1:])
    print(f"model {model.config.arch} {model.config.feature_level}: embedding {embedding}, map {map_shape} "
          f"({np.prod(map_shape) * 2 / 1e3:.0f} KB a face on disk)")
    if args.out.exists():
        shutil.rmtree(args.out)
    Gallery.create(args.out, model, args.model)
    print("\n| faces | append faces/s | index build | query p50 | query p95 | resident: allocated + mapped files |\n"
          "|---|---|---|---|---|---|")
    written = 0
    context = multiprocessing.get_context("spawn")
    for size in (int(s) for s in args.sizes.split(",")):
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            rate = pool.submit(append, str(args.out), str(args.model), written, size, args.shard, embedding,
                               map_shape).result()
        written = size
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            build, p50, p95, anonymous, mapped = pool.submit(measure, str(args.out), args.queries, embedding,
                                                             map_shape).result()
        print(f"| {size:,} | {rate:,.0f} | {build:.2f} s | {p50:.0f} ms | {p95:.0f} ms | "
              f"{anonymous:.2f} + {mapped:.2f} GB |", flush=True)
    if not args.keep:
        shutil.rmtree(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
