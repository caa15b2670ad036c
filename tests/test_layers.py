"""The layering of docs/architecture.md, pinned: every module's imports (read from its source
with ``ast``, lazy imports inside functions included) must stay inside what its layer may use,
and the project's modules must import each other without a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Repository folder -> installed package (pyproject.toml's package-dir).
FOLDERS = {"edgeqlora": "edgeqlora", "exporters": "edgeqlora.exporters",
           "runtimes": "edgeqlora.runtimes", "devices": "edgeqlora.devices"}
# The torch-free core every folder may use (docs/architecture.md, "The core").
CORE = {"edgeqlora", "edgeqlora.errors", "edgeqlora.artifacts", "edgeqlora.metrics",
        "edgeqlora.heldout", "edgeqlora.rows", "edgeqlora.config", "edgeqlora.schema",
        "edgeqlora.threads", "edgeqlora.progress"}
CORE_PACKAGES = ("edgeqlora.tasks",)
# Third-party libraries a layer must never import (training-side and heavy ones).
TRAINING_LIBS = {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}
FORBIDDEN_LIBS = {
    "core": TRAINING_LIBS | {"llama_cpp", "onnx", "onnxruntime", "gguf"},
    "runtimes": TRAINING_LIBS,
    "devices": TRAINING_LIBS,
    "exporters": {"peft"},
    "stages": set(),
}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = modules()


def layer(name: str) -> str:
    if name in CORE or name.startswith(tuple(p + "." for p in CORE_PACKAGES)) \
            or name in CORE_PACKAGES:
        return "core"
    for kind in ("exporters", "runtimes", "devices"):
        if name == f"edgeqlora.{kind}" or name.startswith(f"edgeqlora.{kind}."):
            return kind
    return "stages"


def imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported name, line) for every import in the module, relative ones resolved. A name
    that is a module of ours resolves to that module (``from pkg import mod``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.append((sub if sub in MODULES else mod, node.lineno))
    return found


def internal(target: str) -> str | None:
    """The module of ours that an import names (a package's __init__ for a name in it)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def allowed(src: str, dst: str) -> bool:
    """May module ``src`` import our module ``dst``? The table of docs/architecture.md."""
    s, d = layer(src), layer(dst)
    if d == "core" or s == "stages":
        return True
    if s == "core":
        return False
    if s == "runtimes":
        return d == "runtimes"
    if s == "exporters":
        if d == "runtimes" or dst == "edgeqlora.exporters":
            return True
        # its own package's siblings only (gguf never imports onnx, nor the reverse)
        own = ".".join(src.split(".")[:3])
        return d == "exporters" and (dst == own or dst.startswith(own + "."))
    if s == "devices":
        # the exporters' registry and their size predictions, nothing else of theirs
        return d in ("runtimes", "devices") or dst == "edgeqlora.exporters" \
            or (d == "exporters" and dst.endswith(".predict"))
    raise AssertionError(s)


def graph() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        edges[name] = {t for t in (internal(m) for m, _ in imports(name, path))
                       if t and t != name}
    return edges


def test_the_table_knows_every_module():
    assert "edgeqlora.export" in MODULES and "edgeqlora.exporters.gguf" in MODULES
    assert layer("edgeqlora.metrics") == "core" and layer("edgeqlora.export") == "stages"
    assert layer("edgeqlora.exporters.onnx.verify") == "exporters"


def test_no_module_crosses_the_table():
    crossings = []
    for name, path in MODULES.items():
        banned = FORBIDDEN_LIBS[layer(name)]
        for target, line in imports(name, path):
            rel = f"{path.relative_to(ROOT)}:{line}"
            ours = internal(target) if target.startswith("edgeqlora") else None
            if ours and not allowed(name, ours):
                crossings.append(f"{rel}: {layer(name)} module {name} imports {ours} "
                                 f"({layer(ours)})")
            elif not target.startswith("edgeqlora") and target.split(".")[0] in banned:
                crossings.append(f"{rel}: {layer(name)} module {name} imports {target}")
    assert not crossings, "\n".join(crossings)


def test_no_import_cycle():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("bad", [
    ("edgeqlora.exporters.gguf.writer", "edgeqlora.merge"),
    ("edgeqlora.exporters.onnx.nf4", "edgeqlora.qlora"),
    ("edgeqlora.exporters.gguf.verify", "edgeqlora.exporters.onnx"),
    ("edgeqlora.runtimes.gguf", "edgeqlora.export"),
    ("edgeqlora.devices.fit", "edgeqlora.exporters.gguf.writer"),
    ("edgeqlora.heldout", "edgeqlora.data"),
])
def test_the_checker_sees_a_crossing(bad):
    # The rules themselves, on imports the tree must never have.
    assert not allowed(*bad)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    long.update({str(p.relative_to(ROOT)): n for p in sorted((ROOT / "bench").glob("*.py"))
                 if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500})
    assert not long, long


def test_no_banner_comments():
    # STYLE.md: comments say why; no "# ---- section ----" rules, in code or tests.
    rule = re.compile(r"^\s*#.*(-{6,}|={6,})\s*$")
    files = [*MODULES.values(), *sorted((ROOT / "bench").glob("*.py")),
             *sorted((ROOT / "tests").glob("*.py"))]
    banners = [f"{p.relative_to(ROOT)}:{i}" for p in files
               for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
               if rule.match(line)]
    assert not banners, banners


def test_docs_architecture_names_the_same_layers():
    # docs/architecture.md is the table this file enforces: its core row lists exactly CORE, and
    # every module of edgeqlora/ is named in some row, so a new module gets a layer on paper.
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = {m.group(1): line.split("|")[2] for line in doc.splitlines()
            if (m := re.match(r"\| \*\*(\w+)\*\*", line))}
    names = lambda cell: set(re.findall(r"`(?:edgeqlora\.)?([a-z_]+\*?)", cell))  # noqa: E731
    core = {n for n in names(rows["core"]) if not n.startswith("tasks")}
    assert {f"edgeqlora.{n}" for n in core} == CORE - {"edgeqlora"}
    listed = names(rows["core"]) | names(rows["stages"])
    top = {p.stem for p in (ROOT / "edgeqlora").glob("*.py")} - {"__init__", "__main__"}
    missing = {m for m in top if m not in listed
               and not any(n.endswith("*") and m.startswith(n[:-1]) for n in listed)}
    assert not missing, f"modules with no row in docs/architecture.md: {sorted(missing)}"
