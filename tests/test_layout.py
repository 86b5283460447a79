"""The package's shape: no import circles, no module past the size where it should be split."""
import ast
from pathlib import Path

import occface

ROOT = Path(occface.__file__).parent
SHIMS = {"align", "align_folder", "gallery", "train", "objective", "losses", "evaluate", "metrics", "reports", "export",
         "onnx_model"}  # earlier public paths, kept as aliases of the modules that moved


def module_name(path: Path) -> str:
    parts = ["occface", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The occface modules ``path`` imports, anywhere in it (functions and TYPE_CHECKING blocks
    included): the module named, or for ``from package import name`` the submodule when ``name``
    is one. (Importing a submodule also runs its package's ``__init__``; a package importing its
    own modules is how packages are made, so that implicit edge is not counted.)"""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_import_circles():
    found = modules()
    graph = {name: imports_of(path, name, set(found)) for name, path in found.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for neighbour in graph[node]:
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import circles: {cycles}"


def test_modules_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert not {name: size for name, size in sizes.items() if size > 520}, sorted(sizes.items(), key=lambda x: -x[1])[:5]


def test_earlier_import_paths_still_work():
    import importlib

    for old in SHIMS:
        module = importlib.import_module(f"occface.{old}")
        assert module.__name__.startswith("occface."), old
    from occface.align import FaceAligner  # noqa: F401
    from occface.evaluate import OcclusionPairs, run_eval  # noqa: F401
    from occface.gallery import Gallery  # noqa: F401
    from occface.train import Trainer, build_data, recalibrate  # noqa: F401
