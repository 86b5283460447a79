"""What ``occface enroll`` takes: folders of identity folders, CSVs of (path, identity), single images."""
from __future__ import annotations

import csv
from pathlib import Path

from ..data.errors import DataProblems


def enrollment_items(inputs: list[str | Path], identity: str | None = None) -> list[tuple[Path, str]]:
    """(image, identity) from command-line inputs: a folder of identity folders (``ann/1.jpg`` is
    ann's), a CSV with ``path,identity`` columns (paths relative to the CSV's folder), or, with
    ``identity`` given, single images and folders of that identity's images."""
    from ..data.images import is_image_file

    items, problems = [], []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)
                           and (identity is not None or p.parent != path))
            if not found:
                problems.append(f"{path}: no images in identity folders (expected {path}/<identity>/<image>)"
                                if identity is None else f"{path}: no images")
            items += [(p, identity or p.relative_to(path).parts[0]) for p in found]
        elif path.suffix.lower() == ".csv" and path.is_file():
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                if not reader.fieldnames or not {"path", "identity"} <= set(reader.fieldnames):
                    problems.append(f"{path}: a CSV of faces needs 'path' and 'identity' columns, has {reader.fieldnames}")
                    continue
                items += [(path.parent / row["path"], row["identity"]) for row in reader]
        elif path.is_file() and is_image_file(path):
            if identity is None:
                problems.append(f"{path}: a single image needs --identity NAME")
                continue
            items.append((path, identity))
        else:
            problems.append(f"{path}: not found, or not a folder, CSV or image")
    missing = [f"{p}: image not found" for p, _ in items if not Path(p).is_file()]
    if problems or missing:
        raise DataProblems("enrol inputs", problems + missing)
    return items
