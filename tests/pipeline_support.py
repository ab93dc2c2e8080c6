"""A tiny, fast configuration of the whole pipeline, shared by the orchestration tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# Beyond the `tiny` profile: fewer eval pairs and steps, so each orchestrator runs the DAG in about a minute.
TINY = {
    "profile": "tiny",
    "data": {"eval_sets": [{"name": "lfw", "kind": "lfw", "folds": [10], "max_pairs": 60}], "max_identities": 8},
    "teacher": {"batch_size": 8, "max_steps_per_epoch": 2},
    "student": {"batch_size": 8, "max_steps_per_epoch": 2},
    "runtime": {"holdout_pairs": 0, "threads": 2},
    "evaluate": {"resolutions": [14, 112], "nfolds": 2, "protocols": ["linear", "realistic"]},
    "registry": {"max_drop": 100.0, "min_improvement": -100.0},
}


def tiny_overrides(work: Path) -> dict:
    """TINY plus this test's own stores (never the repo's runs/)."""
    over = yaml.safe_load(yaml.safe_dump(TINY))
    over["run_dir"] = str(work / "runs")
    over["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "artifact_location": str(work / "mlartifacts")}
    over["storage"] = {"cache_dir": str(work / "cache")}
    return over


def copy_repo(dest: Path) -> Path:
    """The files a fresh clone would have (tracked + untracked-not-ignored), in a new git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest
