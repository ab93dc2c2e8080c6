"""dvc.yaml's deps cover the code each stage runs, so a code change can never leave `dvc status` falsely clean.

For every stage whose command is ``python -m <module>``, the in-repo import closure of that module (every
``import``/``from`` in any function, followed through ``crfr``, ``components`` and ``pipeline``) must lie
under the stage's deps. Command-line plumbing (``crfr/cli.py``, ``crfr/commands/``), empty package markers
and the modules that only log or report errors (``crfr/errors.py``, ``crfr/tracking.py``) change no result and are
left out, as in ``../shared/checks/10-one-home-per-idea``. ``crfr/storage/`` only moves bytes too, but that check
counts a package's files, so the stages list it.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("crfr", "components", "pipeline")
NO_RESULT = {"crfr/errors.py", "crfr/tracking.py"}


def module_file(module: str) -> str | None:
    base = module.replace(".", "/")
    for candidate in (base + ".py", base + "/__init__.py"):
        if (REPO / candidate).is_file():
            return candidate
    return None


def imported_names(path: str) -> list[str]:
    """Every module (and ``module.name``, which may be a submodule) that ``path`` imports anywhere."""
    tree = ast.parse((REPO / path).read_text())
    package = os.path.dirname(path).replace("/", ".")
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = base + ("." + node.module if node.module else "")
            else:
                module = node.module or ""
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def import_closure(module: str) -> set[str]:
    """Repo-relative files that ``python -m module`` can import (command-line plumbing excluded)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name.split(".")[0] not in PACKAGES or name == "crfr.cli" or name.startswith("crfr.commands"):
            continue
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a/__init__ too
        todo += imported_names(path)
    return seen


def relevant(path: str) -> bool:
    if path in NO_RESULT:
        return False
    return not (path.endswith("__init__.py") and (REPO / path).stat().st_size < 200)


def stage_modules(dvc_yaml: dict) -> dict[str, tuple[str, list[str]]]:
    """stage name -> (module its cmd runs, deps without ``${...}`` templates)."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        body = stage.get("do", stage) if "foreach" in stage else stage
        cmd = body.get("cmd", "")
        cmd = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
        found = re.search(r"python\S*\s+-m\s+([\w.]+)", cmd)
        if found:
            deps = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps") or []]
            out[name] = (found.group(1), [os.path.normpath(d) for d in deps if "${" not in d])
    return out


def uncovered(dvc_yaml: dict) -> list[str]:
    missing = []
    for name, (module, deps) in stage_modules(dvc_yaml).items():
        for path in sorted(filter(relevant, import_closure(module))):
            if not any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps):
                missing.append(f"{name}: {path}")
    return missing


@pytest.fixture(scope="module")
def dvc_yaml() -> dict:
    """The stages of dvc.yaml."""
    return {"stages": yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]}


def test_every_stage_runs_a_module(dvc_yaml):
    stages = stage_modules(dvc_yaml)
    assert set(stages) == set(dvc_yaml["stages"]), "a stage whose code cannot be traced"
    for module, _ in stages.values():
        assert module_file(module), module


def test_deps_cover_each_stages_import_closure(dvc_yaml):
    assert uncovered(dvc_yaml) == [], "add these files (or their folders) to the stage's deps in dvc.yaml"


def test_closure_follows_imports_inside_functions():
    # components.evaluate imports the evaluation library inside functions (to keep `crfr --help` fast).
    closure = import_closure("components.evaluate")
    assert {"components/evaluate.py", "crfr/evaluation/run.py", "crfr/evaluation/verification.py", "crfr/degrade.py",
            "crfr/models/iresnet.py"} <= closure
    assert not any(p.startswith("crfr/commands/") or p == "crfr/cli.py" for p in closure)


def test_a_dropped_dep_is_caught(dvc_yaml):
    """The check itself can fail: removing one dep of the evaluate stage is reported, by file."""
    broken = yaml.safe_load(yaml.safe_dump(dvc_yaml))
    broken["stages"]["evaluate"]["deps"].remove("crfr/degrade.py")
    assert uncovered(broken) == ["evaluate: crfr/degrade.py"]


def test_deps_exist(dvc_yaml):
    """A misspelt dep would cover nothing and hide a file from DVC."""
    for name, (_, deps) in stage_modules(dvc_yaml).items():
        for dep in deps:
            if dep.split("/")[0] in PACKAGES:
                assert (REPO / dep).exists(), f"{name}: {dep}"
