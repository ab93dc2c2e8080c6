"""What one pipeline stage cost: wall time, user and system CPU time and peak resident memory.

``scripts/main.sh`` sets ``CRFR_STAGE_USAGE`` to a folder; every step run by DVC (``python -m components.<step>``,
which knows its stage from DVC's ``DVC_STAGE``) then leaves ``<stage>.json`` there when it exits, and
``crfr report --stages DIR`` gathers them into ``reports/run.json`` under ``stages``. CPU time and peak memory
include the step's child processes that it waited for (decoding workers, data loader workers); wall time runs
from the process's start, imports included.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

USAGE_DIR_VARIABLE = "CRFR_STAGE_USAGE"
FIELDS = ("wall_s", "user_s", "sys_s", "max_rss_mb")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 of stat(5); the split starts at field 3
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))


def usage(wall_s: float) -> dict[str, float]:
    """This process's and its waited-for children's CPU time and peak RSS, with the given wall time."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_s": round(wall_s, 1),
        "user_s": round(own.ru_utime + children.ru_utime, 1),
        "sys_s": round(own.ru_stime + children.ru_stime, 1),
        "max_rss_mb": round(max(own.ru_maxrss, children.ru_maxrss) / 1024, 1),  # Linux reports KiB
        "minor_faults": own.ru_minflt + children.ru_minflt,
    }


def stage_name(addressing: str) -> str:
    """DVC's stage address without its dvc.yaml: ``sub/dvc.yaml:register`` -> ``register``."""
    return addressing.rsplit(":", 1)[-1]


def record(started: float, exit_code: int) -> Path | None:
    """Write this stage's usage into ``$CRFR_STAGE_USAGE/<stage>.json`` when run by DVC with that folder set.

    Args:
        started: ``time.monotonic()`` when the step's command line began, used where the process age is unknown.
        exit_code: the step's exit status, kept beside the numbers.
    """
    folder, stage = os.environ.get(USAGE_DIR_VARIABLE), os.environ.get("DVC_STAGE")
    if not folder or not stage:
        return None
    age = process_age_s()
    entry = usage(age if age is not None else time.monotonic() - started) | {"exit_code": exit_code}
    path = Path(folder) / f"{stage_name(stage)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry))
    return path


def gather(folder: Path) -> dict[str, dict]:
    """Every stage's record in ``folder``, by stage name, in the order the stages finished."""
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
    return {path.stem: json.loads(path.read_text()) for path in files}
