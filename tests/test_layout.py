"""The package's architecture, checked: one subpackage per pillar, imports that run one way, no private
name borrowed from another module, every RLE function in `nemo_hf.masks`, every public name resolvable."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_hf"
PILLARS = ("source", "folder", "mining", "transforms", "training", "evaluation", "inspection", "zeroshot")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every ``from ... import`` of nemo_hf in the module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "nemo_hf" or target.startswith("nemo_hf."):
                out.append((target, [alias.name for alias in node.names]))
    return out


def test_the_top_level_holds_a_handful_of_modules_and_a_subpackage_per_pillar():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(top) <= 8, top
    assert sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()) == sorted(PILLARS)


def test_no_private_name_is_imported_from_another_module():
    borrowed = [
        f"{name}: {target}.{imported}"
        for name, path in modules().items()
        for target, names in imports(name, path)
        for imported in names
        if imported.startswith("_") and not imported.startswith("__") and target != name
    ]
    assert borrowed == []


def test_imports_have_no_cycles():
    mods = modules()
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        for target, names in imports(name, path):
            for imported in names:  # "from . import x" imports the module x
                graph[name].add(f"{target}.{imported}" if f"{target}.{imported}" in mods else target)
    graph = {name: {t for t in targets if t in mods and t not in ("nemo_hf", name)} for name, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_rle_functions_are_defined_in_masks_only():
    rle = {"encode_rle", "decode_rle", "decode_mask", "check_rle", "rle_problem", "segmentation_to_rle", "rle_runs",
           "rle_sample"}
    defined = {
        (node.name, path.relative_to(PACKAGE).as_posix())
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and ("rle" in node.name.lower() or node.name in rle)
    }
    assert {where for _, where in defined} == {"masks.py"}, sorted(defined)
    assert {name for name, _ in defined} >= rle


@pytest.mark.parametrize("package", ["nemo_hf", *(f"nemo_hf.{p}" for p in PILLARS if p != "zeroshot")])
def test_every_exported_name_resolves(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        module.nonexistent


def test_importing_a_pillar_loads_nothing_heavy():
    """The pillars' names load their modules on first use: `import nemo_hf.training` (or any pillar) must not
    pull in torch, transformers or FAISS, so the command line and `import nemo_hf` stay fast."""
    code = (
        "import sys, nemo_hf, " + ", ".join(f"nemo_hf.{p}" for p in PILLARS if p != "zeroshot") + "\n"
        "print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
