"""The same DAG as a Prefect 3 flow, deployable to a work pool: per-step caching, results on S3, resumable training.

Run here: ``python -m pipeline.prefect_flow --params params.yaml --workdir outputs/prefect [--results s3://...]``
(a temporary Prefect server, unless ``PREFECT_API_URL`` names one). Deploy: ``prefect.yaml`` at the repository root
(a ``process`` work pool for this machine, a ``kubernetes`` one with ``k8s/prefect/base-job-template.json``).

Cache keys. As Kubeflow's tasks do (``pipeline/kfp_pipeline.py``), each task receives only the params its step
reads (:mod:`crfr.config.steps`), and its cache key is the step name, that slice, the code version
(:func:`code_version`), its output location and a fingerprint of each input folder (local: paths, sizes and
mtimes; ``s3://``: keys, sizes and ETags). An edit of a key that only one step reads re-runs that step and those
downstream of its output, nothing else. A task whose output has gone missing runs again and refreshes its entry.

Results. Cached task results persist under ``results``: an ``s3://`` prefix (through fsspec's s3fs, credentials from
the AWS environment only) or a local folder; by default Prefect's local storage. They are the steps' JSON summaries,
stored as JSON. Prefect takes each record's serializer from the record itself, so whoever can write under that
prefix can make a flow run load what they wrote: give it the trust of the image registry.

Retries. Each step is retried once, and the training steps always resume from their last checkpoint, which is kept
per flow run (:func:`resumable`). ``register`` is neither retried nor cached: a second attempt would register a
second model version, and a cached result would skip the promotion decision.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, task
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from crfr import storage
from crfr.cli import add_params_args, run_guarded
from crfr.config import Params, load_params, params_from_json
from crfr.config.steps import STEP_PARAMS, slice_json
from crfr.registry.lineage import PIPELINE_RUN_ENV
from crfr.storage.s3 import listing

# Files an image is built from that are not code: params reach every task as its slice, and prefect.yaml only says
# where the flow runs. Counted, any edit of params.yaml would re-run every step.
NOT_CODE = frozenset({"params.yaml", "prefect.yaml"})
# Task arguments that say where bytes go while a step runs, not what it computes: outside the cache key.
NOT_KEYED = {"checkpoints"}


@functools.cache
def code_version() -> str:
    """SHA-256 over the code the steps run: the files the images are tagged by (:mod:`pipeline.images`), less
    :data:`NOT_CODE`. Computed once per process, so a file saved during a run does not split its cache keys."""
    from pipeline import images

    return images.source_digest(images.REPO, leave_out=NOT_CODE)


def fingerprint(path: str | None) -> str:
    """Cheap content fingerprint of an input folder: local paths, sizes and mtimes; s3:// keys, sizes and ETags."""
    if not path:
        return "none"
    digest = hashlib.sha256()
    if storage.is_s3(path):
        objects = sorted(listing(path), key=lambda o: o["Key"])
        for obj in objects:
            digest.update(f"{obj['Key']}:{obj['Size']}:{obj['ETag']};".encode())
        return digest.hexdigest() if objects else f"absent:{path}"
    if not os.path.exists(path):
        return f"absent:{path}"
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(root.parent)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def cache_key(context: TaskRunContext, arguments: dict) -> str:
    """Step name + code version + params slice + output location + the content of every input folder."""
    parts = [context.task.name, f"code:{code_version()}"]
    for name, value in sorted(arguments.items()):
        if name in NOT_KEYED:
            continue
        if name == "out_dir":
            parts.append(f"out:{value}")
        elif name.endswith("_dir"):
            parts.append(f"{name}:{fingerprint(value)}")
        elif name.endswith("_dirs"):
            parts.append(f"{name}:" + ",".join(fingerprint(v) for v in value))
        else:
            parts.append(f"{name}:{value}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def plain(result: dict) -> dict:
    """A step's summary as plain JSON (the result serializer's input); objects become their text."""
    return json.loads(json.dumps(result, default=str))


@contextlib.contextmanager
def resumable(params_json: str, model: str, checkpoints: str | None) -> Iterator[Params]:
    """The training step's params, checkpointing where this flow run's retries, and only they, look.

    ``run_dir`` is shared by every run on one machine, and a checkpoint left there by an earlier run with other
    settings would be refused by ``resume``. So each flow run trains in ``<run_dir>/prefect/<flow run id>/<model>``,
    mirrored to ``<checkpoints or runtime.checkpoint_uri>/<flow run id>`` when either is given (a rescheduled pod
    starts on a new disk). A task retry and a flow run retry keep the id and continue; the local folder goes once
    the model is published.
    """
    params = params_from_json(params_json)
    run = str(flow_run.id or "no-flow-run")
    local = Path(params.run_dir) / "prefect" / run / model
    params.run_dir = str(local)
    mirror = checkpoints or params.runtime.checkpoint_uri
    if mirror:
        params.runtime.checkpoint_uri = f"{mirror.rstrip('/')}/{run}"
    yield params
    shutil.rmtree(local, ignore_errors=True)
    with contextlib.suppress(OSError):  # the run's folder, once its last model is published
        local.parent.rmdir()


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """``name=value`` in this process while the block runs, then the previous value."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


CACHED = {"cache_key_fn": cache_key, "persist_result": True, "result_serializer": "json", "retries": 1,
          "retry_delay_seconds": 5}


@task(name="prepare", **CACHED)
def prepare_task(source_dir: str | None, out_dir: str, params_json: str) -> dict:
    from components.prepare import prepare

    return plain(prepare(source_dir, out_dir, params_from_json(params_json)))


@task(name="synthesize", **CACHED)
def synthesize_task(prepared_dir: str, out_dir: str, params_json: str) -> dict:
    from components.synthesize import synthesize

    return plain(synthesize(prepared_dir, out_dir, params_from_json(params_json)))


@task(name="train-teacher", **CACHED)
def train_teacher_task(prepared_dir: str, out_dir: str, params_json: str, checkpoints: str | None = None) -> dict:
    from components.train_teacher import train_teacher

    with resumable(params_json, "teacher", checkpoints) as params:
        return plain(train_teacher(prepared_dir, out_dir, params, resume=True))


@task(name="distill-student", **CACHED)
def distill_student_task(prepared_dir: str, teacher_dir: str, out_dir: str, params_json: str, row: str,
                         checkpoints: str | None = None) -> dict:
    from components.distill_student import distill_student

    with resumable(params_json, row, checkpoints) as params:
        return plain(distill_student(prepared_dir, teacher_dir, out_dir, params, row=row, resume=True))


@task(name="evaluate", **CACHED)
def evaluate_task(prepared_dir: str, probes_dir: str, models_json: str, model_dirs: list[str], out_dir: str,
                  params_json: str) -> dict:
    from components.evaluate import evaluate

    return plain(evaluate(prepared_dir, probes_dir, json.loads(models_json), out_dir, params_from_json(params_json)))


@task(name="register", retries=0)
def register_task(model_dir: str, teacher_dir: str, eval_dir: str, out_dir: str, params_json: str,
                  prepared_dir: str | None = None) -> dict:
    # Neither retried nor cached: the registry is state outside this flow, where an attempt that failed after
    # registering has already added a version, and the promotion gate must see the current champion.
    from components.register import register

    with environment(PIPELINE_RUN_ENV, f"prefect:{flow_run.id}"):  # the version's lineage names this flow run
        return plain(register(model_dir, eval_dir, out_dir, params_from_json(params_json), role="student",
                              teacher_dir=teacher_dir, prepared_dir=prepared_dir))


def resolve_params(params_json: str | None, params_file: str, overrides: list[str] | None) -> Params:
    """``params_json``, else ``params_file``, with ``overrides`` applied.

    Raises:
        ConfigError: the file is missing, or the params or an override are invalid.
    """
    if params_json is None:
        return load_params(params_file, overrides or [])
    if not overrides:
        return params_from_json(params_json)
    with tempfile.TemporaryDirectory(prefix="crfr-params-") as tmp:
        file = Path(tmp) / "params.json"  # JSON is YAML: load_params reads it as a params file
        file.write_text(params_json)
        return load_params(file, overrides)


def result_storage(location: str | None):
    """Prefect's storage for this run's task results: an s3:// prefix, a local folder, or None (Prefect's default).

    S3 goes through fsspec's s3fs with the endpoint crfr.storage uses (``AWS_ENDPOINT_URL`` or params); the
    credentials come from the standard AWS chain and never enter the block. Prefect takes only saved blocks, so
    the block is saved (under a name derived from its settings, which a later run overwrites with the same).
    """
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    if not location:
        return None
    if storage.is_s3(location):
        storage.exists(location)  # a missing bucket or refused credentials: now, not after the first step ran
        endpoint = storage.endpoint_url()
        # MinIO, Ceph and moto want path-style URLs, as crfr.storage's own client does for a custom endpoint.
        settings = ({"client_kwargs": {"endpoint_url": endpoint}, "config_kwargs": {"s3": {"addressing_style": "path"}}}
                    if endpoint else {})
        block = RemoteFileSystem(basepath=location.rstrip("/"), settings=settings)
    else:
        block = LocalFileSystem(basepath=str(Path(location).expanduser().resolve()))
    name = "crfr-results-" + hashlib.sha256(block.model_dump_json().encode()).hexdigest()[:12]
    block.save(name, overwrite=True)
    return block


@flow(name="crfr", log_prints=True)
def crfr_flow(params_json: str | None = None, params_file: str = "params.yaml", overrides: list[str] | None = None,
              workdir: str = "outputs/prefect", source: str | None = None, results: str | None = None,
              checkpoints: str | None = None) -> dict:
    """prepare -> synthesize -> teacher -> student (+ Table I rows) -> evaluate -> register.

    Args:
        params_json: the resolved params (``Params.model_dump_json()``); None: read ``params_file``.
        params_file: a params.yaml, relative to the working directory the deployment's pull step set.
        overrides: ``section.key=value`` items (``--set``), applied last.
        workdir: where the steps' outputs go: a local folder or an s3:// prefix (on a cluster, the next pod's
            disk is a new one: use s3://).
        source: the raw dataset (default: params ``data.root``).
        results: where task results, and so the cache, persist: an s3:// prefix or a local folder (default:
            Prefect's local storage, ``PREFECT_LOCAL_STORAGE_PATH``).
        checkpoints: an s3:// prefix training checkpoints are mirrored to, under the flow run id (default: params
            ``runtime.checkpoint_uri``, if set).

    Returns:
        The register step's ``registration.json``.
    """
    params = resolve_params(params_json, params_file, overrides)
    storage.configure(params.storage)
    store = result_storage(results)
    slices = {step: slice_json(params, step) for step in STEP_PARAMS}

    def run(step, out_dir: str):
        # Forced to run (refreshing its cache entry) when its output has gone, whatever the cache holds.
        return step.with_options(result_storage=store, refresh_cache=not storage.exists(out_dir))

    work = workdir.rstrip("/")
    prepared, probes = f"{work}/prepared", f"{work}/probes"
    teacher, student = f"{work}/models/teacher", f"{work}/models/student"
    run(prepare_task, prepared)(source, prepared, slices["prepare"])
    synth = run(synthesize_task, probes).submit(prepared, probes, slices["synthesize"])
    run(train_teacher_task, teacher)(prepared, teacher, slices["train_teacher"], checkpoints)
    models = {"teacher": teacher, "student": student}
    run(distill_student_task, student)(prepared, teacher, student, slices["distill_student"], "default", checkpoints)
    for row in params.ablation_rows:
        models[row] = f"{work}/models/ablation/{row}"
        run(distill_student_task, models[row])(prepared, teacher, models[row], slices["distill_row"], row,
                                               checkpoints)
    synth.result()
    report = f"{work}/reports/evaluate"
    run(evaluate_task, report)(prepared, probes, json.dumps(models), list(models.values()), report,
                               slices["evaluate"])
    return register_task(student, teacher, report, f"{work}/reports/register", slices["register"], prepared)


def run_flow(params: Params, workdir: str, source: str | None = None, results: str | None = None,
             checkpoints: str | None = None) -> dict:
    """Run the flow in this process (``PREFECT_API_URL`` unset: on a temporary Prefect server)."""
    return crfr_flow(params.model_dump_json(), workdir=workdir, source=source, results=results,
                     checkpoints=checkpoints)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.prefect_flow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_args(parser)
    parser.add_argument("--workdir", default="outputs/prefect", help="where outputs go (default: %(default)s)")
    parser.add_argument("--source", default=None, help="raw dataset (default: params data.root)")
    parser.add_argument("--results", default=None,
                        help="where task results (the cache) persist: s3://bucket/prefix or a folder "
                             "(default: Prefect's local storage)")
    parser.add_argument("--checkpoints", default=None, help="s3:// prefix to mirror training checkpoints to")
    args = parser.parse_args(argv)
    return run_guarded(lambda: print(json.dumps(run_flow(load_params(args.params, args.overrides), args.workdir,
                                                         args.source, args.results, args.checkpoints),
                                                indent=2, default=str)) or 0)


if __name__ == "__main__":
    sys.exit(main())
