"""The same DAG as a Prefect 3 flow: tasks with retries and input-based caching, calling components/.

Run locally: ``python -m pipeline.prefect_flow --params params.yaml --workdir outputs/prefect``.
Each task's cache key is the step name, the resolved params, its output location and a fingerprint (paths,
sizes, mtimes) of its input folders; a task whose output folder has gone missing runs again and refreshes
its cache entry. See the README for deploying the flow to a
Kubernetes work pool.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from prefect import flow, task
from prefect.context import TaskRunContext

from crfr.cli import add_params_args, run_guarded
from crfr.config import Params, load_params, params_from_json


def fingerprint(path: str | None) -> str:
    """Cheap content fingerprint of a local file or folder (paths, sizes, mtimes); s3:// URIs hash as text."""
    if not path or not os.path.exists(path):
        return f"absent:{path}"
    digest = hashlib.sha256()
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(root.parent)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def input_cache_key(context: TaskRunContext, arguments: dict) -> str:
    """Step + params + output location + the content of every input folder."""
    parts = [context.task.name]
    for name, value in sorted(arguments.items()):
        if name == "out_dir":
            parts.append(f"out:{value}")
        elif name.endswith("_dir"):
            parts.append(f"{name}:{fingerprint(value)}")
        elif name.endswith("_dirs"):
            parts.append(f"{name}:" + ",".join(fingerprint(v) for v in value))
        else:
            parts.append(f"{name}:{value}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


TASK_OPTIONS = {"retries": 1, "retry_delay_seconds": 5, "cache_key_fn": input_cache_key, "persist_result": True}


@task(name="prepare", **TASK_OPTIONS)
def prepare_task(source_dir: str | None, out_dir: str, params_json: str) -> dict:
    from components.prepare import prepare

    return prepare(source_dir, out_dir, params_from_json(params_json))


@task(name="synthesize", **TASK_OPTIONS)
def synthesize_task(prepared_dir: str, out_dir: str, params_json: str) -> dict:
    from components.synthesize import synthesize

    return synthesize(prepared_dir, out_dir, params_from_json(params_json))


@task(name="train-teacher", **TASK_OPTIONS)
def train_teacher_task(prepared_dir: str, out_dir: str, params_json: str) -> dict:
    from components.train_teacher import train_teacher

    return train_teacher(prepared_dir, out_dir, params_from_json(params_json))


@task(name="distill-student", **TASK_OPTIONS)
def distill_student_task(prepared_dir: str, teacher_dir: str, out_dir: str, params_json: str, row: str) -> dict:
    from components.distill_student import distill_student

    return distill_student(prepared_dir, teacher_dir, out_dir, params_from_json(params_json), row=row)


@task(name="evaluate", **TASK_OPTIONS)
def evaluate_task(prepared_dir: str, probes_dir: str, models_json: str, model_dirs: list[str], out_dir: str,
                  params_json: str) -> dict:
    from components.evaluate import evaluate

    return evaluate(prepared_dir, probes_dir, json.loads(models_json), out_dir, params_from_json(params_json))


@task(name="register", retries=1, retry_delay_seconds=5)
def register_task(model_dir: str, teacher_dir: str, eval_dir: str, out_dir: str, params_json: str) -> dict:
    # Never cached: the registry is state outside this flow, and the gate must see the current champion.
    from components.register import register

    return register(model_dir, eval_dir, out_dir, params_from_json(params_json), role="student",
                    teacher_dir=teacher_dir)


def producing(step, out_dir: str):
    """The task, forced to run (and refresh its cache entry) when its output folder has gone missing."""
    return step.with_options(refresh_cache=not os.path.exists(out_dir))


@flow(name="crfr", log_prints=True)
def crfr_flow(params_json: str, workdir: str = "outputs/prefect", source: str | None = None) -> dict:
    """prepare -> synthesize -> teacher -> student (+ Table I rows) -> evaluate -> register."""
    params = params_from_json(params_json)
    work = Path(workdir)
    prepared, probes = str(work / "prepared"), str(work / "probes")
    teacher, student = str(work / "models" / "teacher"), str(work / "models" / "student")
    producing(prepare_task, prepared)(source, prepared, params_json)
    synth = producing(synthesize_task, probes).submit(prepared, probes, params_json)
    producing(train_teacher_task, teacher)(prepared, teacher, params_json)
    models = {"teacher": teacher, "student": student}
    producing(distill_student_task, student)(prepared, teacher, student, params_json, "default")
    for row in params.ablation_rows:
        models[row] = str(work / "models" / "ablation" / row)
        producing(distill_student_task, models[row])(prepared, teacher, models[row], params_json, row)
    synth.result()
    report = str(work / "reports" / "evaluate")
    producing(evaluate_task, report)(prepared, probes, json.dumps(models), list(models.values()), report,
                                     params_json)
    return register_task(student, teacher, report, str(work / "reports" / "register"), params_json)


def run_flow(params: Params, workdir: str, source: str | None = None) -> dict:
    return crfr_flow(params.model_dump_json(), workdir, source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.prefect_flow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_args(parser)
    parser.add_argument("--workdir", default="outputs/prefect", help="where outputs go (default: %(default)s)")
    parser.add_argument("--source", default=None, help="raw dataset (default: params data.root)")
    args = parser.parse_args(argv)
    return run_guarded(lambda: print(json.dumps(run_flow(load_params(args.params, args.overrides), args.workdir,
                                                         args.source), indent=2, default=str)) or 0)


if __name__ == "__main__":
    sys.exit(main())
