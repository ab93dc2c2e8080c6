"""The library's layout holds: imports run down the layers of ``docs/architecture.md``, with no circle.

Every import counts, also one inside a function. ``../shared/checks/22-architecture`` looks for circles
only; this test also fails on an import that runs up a layer, which is how circles start.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Top to bottom; a module may import its own layer and the layers below it. A name stands for the module and
# everything under it; the longest name that matches decides.
LAYERS = [
    ["crfr.commands", "crfr.cli"],
    ["crfr.report", "crfr.bench"],
    ["crfr.evaluation.benchmark", "crfr.evaluation.benchmark_sets", "crfr.evaluation.run",
     "crfr.evaluation.identification", "crfr.evaluation.open_set", "crfr.evaluation.tables",
     "crfr.evaluation.plots", "crfr.evaluation.results", "crfr.evaluation.thresholds", "crfr.evaluation.seeds"],
    ["crfr.serve.http", "crfr.serve.live", "crfr.serve.batcher", "crfr.serve.metrics"],  # the service
    ["crfr.registry"],
    ["crfr.gallery"],
    ["crfr.serve"],
    ["crfr.train"],
    ["crfr.evaluation"],  # its protocols: verification, probes, loose_boxes, stats
    ["crfr.models", "crfr.losses", "crfr.degrade"],
    ["crfr.data"],
    ["crfr.faces"],
    ["crfr.storage", "crfr.tracking", "crfr.devices"],
    ["crfr.config"],
    ["crfr.digests", "crfr.secrets", "crfr.errors", "crfr.process", "crfr"],
]


def layer_of(module: str) -> int:
    matches = [(len(name), depth) for depth, names in enumerate(LAYERS) for name in names
               if module == name or module.startswith(name + ".")]
    return max(matches)[1]


def library_modules() -> dict[str, Path]:
    mods = {}
    for file in (REPO / "crfr").rglob("*.py"):
        parts = list(file.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = file
    return mods


def imports(mods: dict[str, Path], sources: dict[str, str] | None = None) -> set[tuple[str, str]]:
    """(importer, imported) pairs between library modules; ``sources`` replaces a module's text (tests)."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = set()
    for module, file in mods.items():
        tree = ast.parse((sources or {}).get(module) or file.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("crfr") else None
                # A package's own __init__ runs before its modules: importing it from inside is not an edge.
                if target and target != module and not module.startswith(target + "."):
                    edges.add((module, target))
    return edges


def upward(edges: set[tuple[str, str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, b in edges if layer_of(b) < layer_of(a))


def test_every_module_has_a_layer():
    for module in library_modules():
        assert 0 <= layer_of(module) < len(LAYERS), module


def test_imports_run_down_the_layers():
    assert upward(imports(library_modules())) == []


def test_an_import_up_a_layer_is_caught():
    """The check can fail: the degradation model importing the trainer is reported."""
    mods = library_modules()
    text = (REPO / "crfr" / "degrade.py").read_text() + "\nfrom crfr.train.loop import Trainer\n"
    assert upward(imports(mods, {"crfr.degrade": text})) == ["crfr.degrade -> crfr.train.loop"]


def test_few_modules_lie_directly_in_the_library():
    flat = [p.name for p in (REPO / "crfr").glob("*.py") if p.name != "__init__.py"]
    assert len(flat) <= 10, sorted(flat)
