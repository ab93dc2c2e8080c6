"""The Kubeflow run's first task (``check-params``): the cluster's settings, every step's params, the input data
and the scratch volume checked once, before any retried step starts (:func:`pipeline.kfp_steps.check_params_op`).

``crfr pipeline preflight`` runs the same checks in the current environment, before a submit.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping

from crfr import secrets, storage
from crfr.config import params_from_json
from crfr.errors import ConfigError, DataError

SETTINGS = "the ConfigMap crfr-settings"
S3_SECRET = "the Secret crfr-s3"
# Tracking stores that live in the pod: a run that trains and registers into one succeeds, and its models
# vanish with the pod.
LOCAL_STORES = ("sqlite:", "file:")
# Credentials boto3 finds without keys in the environment: EKS (IRSA) and GKE/Azure workload identity.
WORKLOAD_IDENTITY = ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                     "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


def _s3_uris(value, found: set[str]) -> set[str]:
    if isinstance(value, str) and value.startswith("s3://"):
        found.add(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            _s3_uris(item, found)
    elif isinstance(value, list):
        for item in value:
            _s3_uris(item, found)
    return found


def check_environment(slices: dict[str, str], source_uri: str | None = None, extra_uris: tuple[str, ...] = (),
                      environ: Mapping[str, str] | None = None) -> None:
    """Fail closed on a cluster: a shared tracking server, and S3 credentials and endpoint for every s3:// path.

    The settings come from the ConfigMap crfr-settings and the Secret crfr-s3 (``k8s/``); a task that ran
    without them would write models into the pod and succeed.

    Args:
        slices: step name -> :func:`crfr.config.steps.slice_json` text (their s3:// paths are checked).
        source_uri: the run's source dataset.
        extra_uris: other locations the run uses (``kubeflow.checkpoint_base``, ``pipeline_root``).
        environ: default ``os.environ``.

    Raises:
        ConfigError: naming the missing or local setting and where it must come from.
    """
    env = os.environ if environ is None else environ
    uri = env.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise ConfigError(f"MLFLOW_TRACKING_URI is not set: {SETTINGS} must hold it (key MLFLOW_TRACKING_URI), "
                          "the URL of the shared MLflow server")
    if uri.startswith(LOCAL_STORES) or "://" not in uri:
        raise ConfigError(f"MLFLOW_TRACKING_URI={secrets.redact_uri(uri)} is a store inside the pod, which vanishes "
                          f"with it: set key MLFLOW_TRACKING_URI of {SETTINGS} to the shared MLflow server's URL")
    uris = set(extra_uris) | ({source_uri} if source_uri else set())
    for text in slices.values():
        _s3_uris(json.loads(text), uris)
    s3 = sorted(u for u in uris if u and u.startswith("s3://"))
    if not s3:
        return
    keys = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(k, "").strip()]
    if keys and not any(env.get(k) for k in WORKLOAD_IDENTITY) and not env.get("AWS_PROFILE"):
        raise ConfigError(f"{s3[0]} needs S3 credentials: {' and '.join(keys)} unset; {S3_SECRET} must hold "
                          f"key{'s' if len(keys) > 1 else ''} {', '.join(keys)} (or give the pod a workload identity)")
    if not env.get("AWS_ENDPOINT_URL", "").strip() and not env.get("AWS_DEFAULT_REGION", "").strip():
        raise ConfigError(f"{s3[0]} needs an S3 endpoint: neither AWS_ENDPOINT_URL nor AWS_DEFAULT_REGION is set; "
                          f"{SETTINGS} must hold key AWS_ENDPOINT_URL (S3-compatible store) or AWS_DEFAULT_REGION (AWS)")


def check_slices(slices: dict[str, str], source_uri: str | None = None, scratch: str | None = None) -> list[str]:
    """Validate every step's params with this installation's crfr, that the data they name exist, and that
    the scratch volume can be written.

    The Kubeflow pipeline runs this in its first task, which has no retries: a configuration error fails
    the run there, once, before a retried (and GPU) step has started.

    Args:
        slices: step name -> :func:`crfr.config.steps.slice_json` text.
        source_uri: the raw dataset the prepare step reads (empty: the prepare slice's ``data.root``).
        scratch: the tasks' scratch volume (the same kind of volume as every step's): it must be writable by
            this process's user, which no Kubernetes fsGroup set through kfp can ensure.

    Returns:
        The inputs found (for the task's log).

    Raises:
        ConfigError: a step's params are invalid here (e.g. the image's crfr is older than the compiler's).
        DataError: the source dataset, the RecordIO training file or an evaluation set is missing.
        ConfigError: the scratch volume is not writable (its storage class makes root-owned volumes).
    """
    if scratch:
        try:
            with tempfile.NamedTemporaryFile(dir=scratch):
                pass
        except OSError as exc:
            raise ConfigError(f"the scratch volume {scratch} is not writable by uid {os.getuid()} ({exc.strerror}): "
                              "set kubeflow.scratch_storage_class to a class whose volumes this user may write, "
                              "or kubeflow.scratch_size / gpu_scratch_size: null") from None

    rebuilt = {}
    for step, text in sorted(slices.items()):
        try:
            rebuilt[step] = params_from_json(text)
        except ConfigError as exc:
            raise ConfigError(f"pipeline step {step!r}: {exc}") from None
    found = []
    if "prepare" in rebuilt:
        data = rebuilt["prepare"].data
        storage.configure(rebuilt["prepare"].storage)
        inputs = [("the source dataset (pipeline parameter source_uri)", source_uri or data.root)]
        if data.train == "recordio":
            inputs.append(("data.train_rec", data.train_rec))
        inputs += [(f"data.eval_sets[{s.name}].path", s.path) for s in data.eval_sets if s.path]
        for what, uri in inputs:
            if uri in found:  # CFP FF and FP read one folder
                continue
            if not storage.exists(uri):
                raise DataError(f"{what} {uri} does not exist")
            found.append(uri)
    return found
