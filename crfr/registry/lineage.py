"""Lineage of a registered model: the code, settings, data and runs that made it.

:func:`collect` gathers it for the register step and :func:`crfr.registry.register.register_model` records it on the
version; :func:`describe` reads it back (``crfr models describe``). What a version carries:

* tags ``lineage.git_commit`` and ``lineage.git_dirty``: ``git rev-parse HEAD`` of the checkout crfr runs from,
  and whether its tracked or untracked files differ from that commit. An image holds no ``.git``: there the
  build bakes in ``CRFR_GIT_COMMIT`` / ``CRFR_GIT_DIRTY`` (docker/); without either, ``unknown``.
* ``lineage.params`` (JSON) and ``lineage.params_sha256``: the resolved params, redacted
  (:func:`crfr.secrets.redact_tree`).
* ``lineage.training_run_id``: the MLflow run that trained the model (``mlflow_run_id`` in ``model.pt``'s meta).
* ``lineage.evaluation_run_id``: the evaluate run whose logged ``evaluation/metrics.json`` is byte for byte the
  evaluation the version was registered from.
* ``lineage.pipeline_run_id``: the orchestrator's run, from ``CRFR_PIPELINE_RUN_ID`` (Kubeflow passes its job
  id) or the register step's argument; absent outside a pipeline.
* ``lineage.train_data`` and ``lineage.eval_data``: fingerprints of the prepared training split (the digest a
  checkpoint resumes on) and of each evaluation set (:mod:`crfr.registry.datasets`), also logged as MLflow dataset
  inputs (contexts ``training`` and ``evaluation``) of the version's run. Only when the register step is given
  the prepared data.

The whole record is also the run's artifact ``lineage.json``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from crfr import secrets
from crfr.config import Params
from crfr.digests import canonical_json, file_digest, sha256_hex
from crfr.registry.reference import parse_reference
from crfr.registry.versions import get_version, recorded_accuracies
from crfr.tracking import connect, mlflow_errors

log = logging.getLogger(__name__)

GIT_COMMIT_ENV = "CRFR_GIT_COMMIT"
GIT_DIRTY_ENV = "CRFR_GIT_DIRTY"
PIPELINE_RUN_ENV = "CRFR_PIPELINE_RUN_ID"
TAG = "lineage."
UNKNOWN = "unknown"
TRAINING, EVALUATION = "training", "evaluation"
# Runs searched for the evaluation a version was registered from, newest first: register follows evaluate.
EVALUATION_RUNS_SEARCHED = 50


@dataclass
class DataRef:
    """A dataset a model was trained or evaluated on: an MLflow dataset input.

    Attributes:
        name: ``train`` or ``eval:<set>`` (the split names of ``manifest.csv``).
        digest: its fingerprint (16 hex digits).
        source: where it lies (local path or ``s3://`` URI).
        context: ``training`` or ``evaluation``.
    """

    name: str
    digest: str
    source: str
    context: str


@dataclass
class Lineage:
    """What made a model version; see the module docstring for where each field comes from."""

    git_commit: str = UNKNOWN
    git_dirty: str = UNKNOWN
    params: dict = field(default_factory=dict)
    training_run_id: str | None = None
    evaluation_run_id: str | None = None
    pipeline_run_id: str | None = None
    datasets: list[DataRef] = field(default_factory=list)
    external_model: dict | None = None  # an adopted teacher: its source, file and sha256 (external.json)

    @property
    def params_sha256(self) -> str:
        return sha256_hex(canonical_json(self.params))

    def to_dict(self) -> dict:
        return {**asdict(self), "params_sha256": self.params_sha256}

    def tags(self) -> dict[str, str]:
        """The version tags (``lineage.*``); run ids that are not known are left out."""
        tags = {"git_commit": self.git_commit, "git_dirty": self.git_dirty, "params": canonical_json(self.params),
                "params_sha256": self.params_sha256, "training_run_id": self.training_run_id,
                "evaluation_run_id": self.evaluation_run_id, "pipeline_run_id": self.pipeline_run_id}
        train = [d.digest for d in self.datasets if d.context == TRAINING]
        if train:
            tags["train_data"] = train[0]
        evals = {d.name.removeprefix("eval:"): d.digest for d in self.datasets if d.context == EVALUATION}
        if evals:
            tags["eval_data"] = json.dumps(evals, sort_keys=True)
        if self.external_model:
            tags["external_model"] = canonical_json(self.external_model)
        return {TAG + k: v for k, v in tags.items() if v}


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):  # no git at all, or a hung filesystem
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: str | os.PathLike | None = None) -> tuple[str, str]:
    """(commit, dirty) of the code: ``dirty`` is ``true``, ``false`` or ``unknown``.

    Args:
        root: the source tree; default the one this crfr package was imported from. Only a checkout whose
            top level is ``root`` counts: a virtual environment inside some other repository does not.
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    top = _git(root, "rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == root.resolve():
        commit = _git(root, "rev-parse", "HEAD")
        status = _git(root, "status", "--porcelain")
        if commit:
            return commit, UNKNOWN if status is None else str(bool(status)).lower()
    commit = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if not commit or commit == UNKNOWN:
        return UNKNOWN, UNKNOWN
    dirty = os.environ.get(GIT_DIRTY_ENV, "").strip().lower()
    return commit, dirty if dirty in ("true", "false") else UNKNOWN


def training_run_id(model_dir: str | os.PathLike) -> str | None:
    """The MLflow run that trained the model in ``model_dir`` (recorded by the training step, or by the teacher
    step that adopted an external model), if any."""
    from crfr.models.external import is_external, load_record
    from crfr.models.model_file import MODEL_FILE, safe_torch_load

    if is_external(model_dir):
        return load_record(model_dir).get("mlflow_run_id") or None
    payload = safe_torch_load(Path(model_dir) / MODEL_FILE, "crfr model")
    meta = payload.get("meta") if isinstance(payload, dict) else None
    run_id = (meta or {}).get("mlflow_run_id")
    return str(run_id) if run_id else None


def external_model(model_dir: str | os.PathLike) -> dict | None:
    """Of an adopted external teacher: its source, file and sha256; None for a model crfr trained."""
    from crfr.models.external import is_external, load_record

    if not is_external(model_dir):
        return None
    record = load_record(model_dir)
    return {k: record.get(k) for k in ("source", "uri", "sha256", "embedding_size")}


def find_evaluation_run(client, experiment: str, metrics_file: Path) -> str | None:
    """The FINISHED evaluate run of ``experiment`` that logged exactly ``metrics_file``, newest first.

    Args:
        client: an ``MlflowClient`` of the tracking store.
        experiment: the experiment name (``tracking.experiment``).
        metrics_file: the evaluation's ``metrics.json``.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    want = file_digest(metrics_file)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id],
                              "tags.`crfr.step` = 'evaluate' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=EVALUATION_RUNS_SEARCHED)
    with tempfile.TemporaryDirectory(prefix="crfr-lineage-") as tmp:
        for k, run in enumerate(runs):
            try:
                path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                           artifact_path="evaluation/metrics.json",
                                                           dst_path=f"{tmp}/{k}")
            except (MlflowException, OSError):  # a run whose artifacts are gone is simply not the one
                continue
            if file_digest(path) == want:
                return run.info.run_id
    return None


def collect(
    model_dir: str | os.PathLike,
    params: Params,
    eval_dir: str | os.PathLike | None = None,
    pipeline_run_id: str | None = None,
) -> Lineage:
    """Gather the lineage of the model in ``model_dir`` (see the module docstring), all but the data.

    The data fingerprints come from the prepared data, which only the register step may have:
    :func:`crfr.registry.datasets.data_refs` fills ``datasets``.

    Args:
        model_dir: the local model directory.
        params: the resolved params (recorded redacted; ``tracking`` finds the evaluation run).
        eval_dir: the local evaluate step output the model is registered from.
        pipeline_run_id: the orchestrator's run id; default ``CRFR_PIPELINE_RUN_ID``.
    """
    commit, dirty = git_state()
    lineage = Lineage(git_commit=commit, git_dirty=dirty, params=secrets.redact_tree(params.model_dump(mode="json")),
                      training_run_id=training_run_id(model_dir), external_model=external_model(model_dir),
                      pipeline_run_id=(pipeline_run_id or os.environ.get(PIPELINE_RUN_ENV, "")).strip() or None)
    if eval_dir is not None and (Path(eval_dir) / "metrics.json").is_file():
        client = connect(params.tracking)
        with mlflow_errors("looking up the evaluation run"):
            lineage.evaluation_run_id = find_evaluation_run(client, params.tracking.experiment,
                                                            Path(eval_dir) / "metrics.json")
        if lineage.evaluation_run_id is None:
            log.warning("no MLflow evaluate run logged %s/metrics.json (evaluated with --no-mlflow, or in "
                        "another experiment): the version records no evaluation run", eval_dir)
    return lineage


def log_to_run(lineage: Lineage) -> None:
    """Record ``lineage`` in the active MLflow run: dataset inputs, ``lineage.json``, the git commit tag."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for ref in lineage.datasets:
        with warnings.catch_warnings():  # MLflow registers the local source class for "" and "file:" alike
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
            source = resolve_dataset_source(ref.source)
        mlflow.log_input(MetaDataset(source, name=ref.name, digest=ref.digest), context=ref.context)
    mlflow.log_dict(lineage.to_dict(), "lineage.json")
    if lineage.git_commit != UNKNOWN:
        mlflow.set_tag("mlflow.source.git.commit", lineage.git_commit)


def describe(client, ref: str) -> dict:
    """What a registered version records: aliases, accuracies, gate, and its lineage (:class:`Lineage`).

    Args:
        client: an ``MlflowClient`` (see :func:`crfr.tracking.connect`).
        ref: the version, as :func:`parse_reference` reads it.

    Raises:
        RegistryError: no such model, version or alias; MLflow unreachable.
    """
    name, which = parse_reference(ref)
    version = get_version(client, name, which)
    tags = version.tags or {}
    datasets = []
    with mlflow_errors(f"reading the run of {name} version {version.version}"):
        run = client.get_run(version.run_id) if version.run_id else None
    for item in (run.inputs.dataset_inputs if run is not None and run.inputs else []):
        context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), None)
        source = item.dataset.source
        with_uri = json.loads(source) if source.startswith("{") else {}
        datasets.append({"name": item.dataset.name, "digest": item.dataset.digest, "context": context,
                         "source": with_uri.get("uri", source)})
    params_text = tags.get(TAG + "params")
    return {
        "name": name,
        "version": str(version.version),
        "uri": f"models:/{name}/{version.version}",
        "aliases": sorted(version.aliases or []),
        "role": tags.get("role"),
        "created": version.creation_timestamp,
        "run_id": version.run_id,
        "git_commit": tags.get(TAG + "git_commit"),
        "git_dirty": tags.get(TAG + "git_dirty"),
        "training_run_id": tags.get(TAG + "training_run_id"),
        "evaluation_run_id": tags.get(TAG + "evaluation_run_id"),
        "pipeline_run_id": tags.get(TAG + "pipeline_run_id"),
        "params_sha256": tags.get(TAG + "params_sha256"),
        "params": json.loads(params_text) if params_text else None,
        "datasets": datasets,
        "accuracies": recorded_accuracies(version),
        "gate_dataset": tags.get("gate_dataset"),
        "gate_protocol": tags.get("gate_protocol"),
        "gate_outcome": tags.get("gate.outcome"),
    }
