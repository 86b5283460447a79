"""The ``occface`` command line."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def _info(args: argparse.Namespace) -> int:
    import torch

    from .models import ARCHITECTURES, Backbone

    print(f"occface {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print(f"{'arch':<10} {'params (M)':>10}  {'block3 map':<12} {'block4 map':<12} (at 112x112)")
    for arch in ARCHITECTURES:
        b3, b4 = Backbone(arch, "block3"), Backbone(arch, "block4")
        params = sum(p.numel() for p in b4.parameters()) / 1e6
        maps = [f"{b.feature_channels}x{b.feature_size}x{b.feature_size}" for b in (b3, b4)]
        print(f"{arch:<10} {params:>10.2f}  {maps[0]:<12} {maps[1]:<12}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="occface", description=__doc__)
    parser.add_argument("--version", action="version", version=f"occface {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, device and the backbone architectures")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
