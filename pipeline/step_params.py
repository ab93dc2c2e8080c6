"""Which params each pipeline step reads: the one table the Kubeflow tasks' params are cut from.

A kfp task's cache key is its inputs. Handing every task the whole params blob made an edit of
``registry.max_drop`` re-run prepare and both GPU trainings; each task now receives, as a constant baked in at
compile time, only the keys its step reads (:func:`params_slice`). A step rebuilds its params from that slice
with :func:`crfr.config.params_from_json`, so every key outside it holds the built-in default, which the step
never looks at. ``tests/test_kfp.py`` runs every step on a slice and fails if it reads a key outside it.

Whole-params records do not count as reads: the model folder's ``config.json``, the MLflow run's params and the
checkpoint fingerprint describe the settings a step ran with (its slice, defaults elsewhere); they do not steer
it. The register step is the exception: the lineage it records on the model version is meant to hold the whole
resolved params, so its task gets all of them.
"""

from __future__ import annotations

import json

from crfr.config import Params, params_from_json
from crfr.errors import ConfigError, DataError

ROWS = "ablation.<rows>"  # stands for ablation.<name> for every name in ablation_rows
ALL = "*"  # every key
TEACHER_SCHEDULE = "teacher<if a row trains on its schedule>"  # `teacher`, when a row has schedule: teacher

# Dotted keys: a section, or one key of a section (a list such as data.eval_sets counts as one key).
_TRAINING = ("seed", "run_dir", "model", "loss", "runtime", "storage", "tracking")
STEP_PARAMS: dict[str, tuple[str, ...]] = {
    # evaluate.nfolds: the folds given to a .bin or CSV evaluation set that has none of its own.
    "prepare": ("seed", "data", "evaluate.nfolds", "storage"),
    "synthesize": ("data.eval_sets", "degrade", "evaluate.resolutions", "evaluate.protocols",
                   "evaluate.realistic_seed", "evaluate.realistic", "storage"),
    "train_teacher": _TRAINING + ("augment", "teacher"),
    "distill_student": _TRAINING + ("degrade", "augment", "student"),
    # A Table I row: its student overrides, and the teacher's schedule for a row that asks for it.
    "distill_row": _TRAINING + ("degrade", "augment", "student", TEACHER_SCHEDULE, ROWS),
    # registry.gate_*: the thresholds are calibrated on the dataset and protocol the gate compares on.
    # runtime.channels_last: the layout of the forward passes (speed only: tests/test_evaluate.py).
    "evaluate": ("data.eval_sets", "evaluate", "registry.gate_dataset", "registry.gate_protocol", "runtime.device",
                 "runtime.channels_last", "storage", "tracking"),
    # The registered version's lineage records the whole resolved params (as DVC's register does), so this
    # task's input changes with any edit: harmless, it is never cached (the registry is state outside kfp).
    "register": (ALL,),
}


def step_keys(step: str, params: Params) -> list[str]:
    """The dotted keys of ``step``'s slice for these params (Table I rows expanded)."""
    if step not in STEP_PARAMS:
        raise KeyError(f"no params table for step {step!r}; known: {sorted(STEP_PARAMS)}")
    keys: list[str] = []
    for key in STEP_PARAMS[step]:
        if key == ROWS:
            keys += [f"ablation.{row}" for row in params.ablation_rows]
        elif key == TEACHER_SCHEDULE:
            keys += ["teacher"] if any(params.ablation[r].schedule == "teacher" for r in params.ablation_rows) else []
        else:
            keys.append(key)
    return keys


def params_slice(params: Params, step: str) -> dict:
    """The part of ``params`` that ``step`` reads, as a JSON-ready nested mapping."""
    tree = params.model_dump(mode="json")
    keys = step_keys(step, params)
    if keys == [ALL]:
        return tree
    out: dict = {}
    for key in keys:
        *parents, leaf = key.split(".")
        node, dst = tree, out
        for part in parents:
            node, dst = node[part], dst.setdefault(part, {})
        dst[leaf] = node[leaf]
    return out


def slice_json(params: Params, step: str) -> str:
    """:func:`params_slice` as the task input kfp hashes: the same params always give the same text.

    Raises:
        ConfigError: the slice does not rebuild into valid params (a cross-section rule needs a key it lacks).
    """
    text = json.dumps(params_slice(params, step), sort_keys=True, separators=(",", ":"))
    try:
        params_from_json(text)
    except ConfigError as exc:
        raise ConfigError(f"the params of pipeline step {step!r} do not stand on their own: {exc}") from None
    return text


def check_slices(slices: dict[str, str], source_uri: str | None = None, scratch: str | None = None) -> list[str]:
    """Validate every step's params with this installation's crfr, that the data they name exist, and that
    the scratch volume can be written.

    The Kubeflow pipeline runs this in its first task, which has no retries: a configuration error fails
    the run there, once, before a retried (and GPU) step has started.

    Args:
        slices: step name -> :func:`slice_json` text.
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
    import os
    import tempfile

    from crfr import storage

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
