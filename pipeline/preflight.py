"""The Kubeflow run's first task (``check-params``): every step's params, the input data and the scratch
volume checked once, before any retried step starts (:func:`pipeline.kfp_pipeline.check_params_op`)."""

from __future__ import annotations

import os
import tempfile

from crfr import storage
from crfr.config import params_from_json
from crfr.errors import ConfigError, DataError


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
