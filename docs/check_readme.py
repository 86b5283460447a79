"""Run every shell block of the README marked ``<!-- runnable -->``, in order, in one working folder.

The blocks are what a reader types after the set-up command: `.ci/run` runs this on a clean clone,
so a README command that stops working fails CI. Each block runs under ``bash -euo pipefail`` with
``.venv/bin`` first on the PATH (as if the environment were active) in its own process group, which
is ended when the block ends (a server a block started cannot outlive it).

    python docs/check_readme.py [--readme README.md] [--workdir DIR] [--list]
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "<!-- runnable -->"
BLOCK = re.compile(r"<!-- runnable -->\s*\n```bash\n(.*?)```", re.S)


def blocks(readme: Path) -> list[str]:
    text = readme.read_text()
    found = BLOCK.findall(text)
    if len(found) != text.count(MARK):
        raise SystemExit(f"{readme}: {text.count(MARK)} runnable marks but {len(found)} bash blocks right after them")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--readme", type=Path, default=root / "README.md")
    parser.add_argument("--workdir", type=Path, default=None, help="where the blocks run (default: a new temporary folder)")
    parser.add_argument("--list", action="store_true", help="print the blocks and stop")
    args = parser.parse_args()
    found = blocks(args.readme)
    if args.list:
        for number, block in enumerate(found, 1):
            print(f"--- block {number}\n{block}")
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="occface-readme-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.symlink(root / ".venv", workdir / ".venv") if not (workdir / ".venv").exists() else None
    env = dict(os.environ, PATH=f"{root / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    for number, block in enumerate(found, 1):
        first = block.strip().splitlines()[0]
        print(f"README block {number}/{len(found)}: {first}{' ...' if block.strip().count(chr(10)) else ''}", flush=True)
        started = time.perf_counter()
        process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=workdir, env=env,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=1800)
        finally:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if code != 0:
            print(f"README block {number} failed (exit {code}) in {workdir}:\n{block}", file=sys.stderr)
            return 1
        print(f"README block {number}: ok ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"every runnable README block ran ({len(found)}), in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
