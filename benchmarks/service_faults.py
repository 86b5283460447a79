"""``occface serve`` killed mid-enrolment: after each restart, database and shards agree and every
acknowledged enrolment is there.

``--kills`` times: start the real server (``occface serve``) on the same gallery and database,
enrol aligned LFW faces from ``--clients`` client threads (each face a new subject-face; a
``201`` answer is an acknowledged write), SIGKILL the server at a random moment (uniform in
``--window`` seconds after the first acknowledgement), start it again, and check with occface's own
readers (the gallery's manifest and shards, the database's rows) that:

* the face ids in the shards and in the database are the same set, subjects included;
* every face id acknowledged so far is in both.

The first check runs after the restart has reconciled the two (what a crash between a shard's
commit and its rows leaves is added then; see :mod:`occface.service.database`).

    python benchmarks/service_faults.py --data ../shared/data --model runs/niqab_lfw_pretrained/full/model
"""
from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: list[str], base: str) -> subprocess.Popen:
    import httpx

    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError(f"the server did not start: {server.stderr.read()[-2000:]}")
        time.sleep(0.2)


def state(gallery_path: Path, db_url: str | None) -> tuple[set[str], set[str], set[str], set[str]]:
    """(face ids in the shards, face ids in the database, subjects of the shards, subjects in the database)."""
    from occface.galleries import Gallery
    from sqlalchemy import select

    from occface.service.database import Database, Face, Subject, database_url

    gallery = Gallery.open(gallery_path, load_model=False)
    entries = gallery.entries()
    database = Database(database_url(db_url, gallery_path))
    with database.session() as session:
        rows = set(session.scalars(select(Face.face_id)))
        subjects = set(session.scalars(select(Subject.id)))
    database.engine.dispose()
    return {e.face_id for e in entries}, rows, {e.identity for e in entries}, subjects


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with lfw112/")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--window", type=float, default=3.0, help="kill within this many seconds of the first ack")
    parser.add_argument("--db", default=None, help="database URL (default: SQLite in the gallery)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import httpx

    faces = sorted((args.data / "lfw112").glob("*/*.jpg"))[:2000]
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="occface-faults-"))
    gallery = work / "gallery"
    acknowledged: set[str] = set()
    lock = threading.Lock()
    next_face = [0]
    failures = 0
    try:
        for kill in range(1, args.kills + 1):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            command = [sys.executable, "-m", "occface.cli", "serve", "--model", str(args.model), "--gallery",
                       str(gallery), "--port", str(port)] + (["--db", args.db] if args.db else [])
            tick = time.perf_counter()
            server = start(command, base)
            started_in = time.perf_counter() - tick
            shards, rows, gallery_subjects, db_subjects = state(gallery, args.db)
            agree = shards == rows and gallery_subjects == db_subjects
            kept = acknowledged <= shards and acknowledged <= rows
            failures += not (agree and kept)
            print(f"restart {kill - 1:>2}: up in {started_in:4.1f} s; {len(shards):>4} faces in the shards, "
                  f"{len(rows):>4} rows; agree: {agree}; all {len(acknowledged)} acknowledged there: {kept}", flush=True)
            stop, first_ack = threading.Event(), threading.Event()

            def client() -> None:
                with httpx.Client(timeout=60) as session:
                    while not stop.is_set():
                        with lock:
                            index = next_face[0]
                            next_face[0] += 1
                        path = faces[index % len(faces)]
                        subject = f"s{index}"
                        try:
                            response = session.post(f"{base}/v1/subjects/{subject}/faces",
                                                    files={"image": (path.name, path.read_bytes(), "image/jpeg")})
                        except httpx.HTTPError:
                            return  # the server was killed under this request: not acknowledged
                        if response.status_code == 201:
                            with lock:
                                acknowledged.add(response.json()["face_id"])
                            first_ack.set()

            threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            first_ack.wait(timeout=120)
            time.sleep(rng.uniform(0, args.window))
            server.send_signal(signal.SIGKILL)
            server.wait()
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        server = start(command, base)  # the last restart, then its check
        shards, rows, gallery_subjects, db_subjects = state(gallery, args.db)
        agree = shards == rows and gallery_subjects == db_subjects
        kept = acknowledged <= shards and acknowledged <= rows
        failures += not (agree and kept)
        print(f"restart {args.kills:>2}: {len(shards):>4} faces in the shards, {len(rows):>4} rows; agree: {agree}; "
              f"all {len(acknowledged)} acknowledged there: {kept}")
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        print(f"\n{args.kills} kills: {failures} restart(s) with the database and shards disagreeing or an "
              f"acknowledged enrolment missing; {len(acknowledged)} enrolments acknowledged, {len(shards)} faces kept")
        return 0 if failures == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
