"""Which params each pipeline step reads: the one table Kubeflow's task inputs are cut from and DVC's stage
params must agree with.

A kfp task's cache key is its inputs. Handing every task the whole params blob made an edit of
``registry.max_drop`` re-run prepare and both GPU trainings; each task now receives, as a constant baked in at
compile time, only the keys its step reads (:func:`params_slice`). A step rebuilds its params from that slice
with :func:`crfr.config.params_from_json`, so every key outside it holds the built-in default, which the step
never looks at. ``tests/test_kfp.py`` runs every step on a slice and fails if it reads a key outside it.

Whole-params records do not count as reads: the model folder's ``config.json``, the MLflow run's params and the
checkpoint fingerprint describe the settings a step ran with (its slice, defaults elsewhere); they do not steer
it. The register step is the exception: the lineage it records on the model version is meant to hold the whole
resolved params, so its task gets all of them.

DVC's stages (``dvc.yaml``) list the same keys, which ``tests/test_step_params.py`` checks: each entry of
:data:`STEP_PARAMS` as written, :data:`ROWS` as ``ablation`` and :data:`TEACHER_SCHEDULE` as ``teacher``, plus
``profile`` and ``profiles.${profile}`` (the active profile's overrides). Keys under ``run_dir``, ``storage``
and ``tracking`` may be left out: they say where bytes go, and moving them does not change an output (``runtime``
is listed, as device and precision change the numbers). A step that reads :data:`ALL` (register) lists what
steers it; the rest it only records, and re-registering a model for a record-only edit would add a duplicate
version. DVC's evaluate also lists ``ablation_rows``: it finds the rows' models by them in its ``--models-dir``,
where a kfp task is handed them.
"""

from __future__ import annotations

from typing import Any

from crfr.config.load import params_from_json
from crfr.config.params import Params
from crfr.digests import canonical_json
from crfr.errors import ConfigError

ROWS = "ablation.<rows>"  # stands for ablation.<name> for every name in ablation_rows
ALL = "*"  # every key
TEACHER_SCHEDULE = "teacher<if a row trains on its schedule>"  # `teacher`, when a row has schedule: teacher
# Top-level keys that say where or how fast a step runs, not what it computes (see shaping_settings).
NOT_SHAPING = ("run_dir", "runtime", "storage", "tracking")

# Dotted keys: a section, or one key of a section (a list such as data.eval_sets counts as one key).
_TRAINING = ("seed", "run_dir", "model", "runtime", "storage", "tracking")
STEP_PARAMS: dict[str, tuple[str, ...]] = {
    # evaluate.nfolds: the folds given to a .bin or CSV evaluation set that has none of its own.
    "prepare": ("seed", "data", "evaluate.nfolds", "storage"),
    # data.align, data.crop_box: where the face sits in the HR images, around which the unaligned boxes are cut.
    "synthesize": ("data.eval_sets", "data.align", "data.crop_box", "degrade", "evaluate.resolutions",
                   "evaluate.protocols", "evaluate.realistic_seed", "evaluate.realistic", "evaluate.unaligned",
                   "storage"),
    # The teacher distils from nobody: of the losses it reads ArcFace's and the weights of Eq. 4's total (whose
    # distillation and wavelet terms it lacks), not loss.temperature or loss.wavesim_stages.
    "train_teacher": _TRAINING + ("loss.arcface_s", "loss.arcface_m", "loss.lambda1", "loss.lambda2", "augment",
                                  "teacher"),
    "distill_student": _TRAINING + ("loss", "degrade", "augment", "student"),
    # A Table I row: its student overrides, and the teacher's schedule for a row that asks for it.
    "distill_row": _TRAINING + ("loss", "degrade", "augment", "student", TEACHER_SCHEDULE, ROWS),
    # registry.gate_*: the thresholds are calibrated on the dataset and protocol the gate compares on.
    # runtime.channels_last: the layout of the forward passes (speed only: tests/test_evaluate.py).
    # data.align ... loose_margin: the unaligned probes are aligned as the models' serving aligns a loose crop.
    "evaluate": ("data.eval_sets", "data.align", "data.crop_box", "data.landmark_min_px", "data.loose_margin",
                 "evaluate", "registry.gate_dataset", "registry.gate_protocol", "runtime.device",
                 "runtime.channels_last", "storage", "tracking"),
    # The registered version's lineage records the whole resolved params (as DVC's register does), so this
    # task's input changes with any edit: harmless, it is never cached (the registry is state outside kfp).
    "register": (ALL,),
}


def step_keys(step: str, params: Params) -> list[str]:
    """The dotted keys of ``step``'s slice for these params (Table I rows expanded).

    Raises:
        KeyError: ``step`` has no row in :data:`STEP_PARAMS`.
    """
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
    text = canonical_json(params_slice(params, step))
    try:
        params_from_json(text)
    except ConfigError as exc:
        raise ConfigError(f"the params of pipeline step {step!r} do not stand on their own: {exc}") from None
    return text


def shaping_settings(params: Params, step: str) -> dict[str, Any]:
    """The settings that decide what ``step`` computes: its slice without the :data:`NOT_SHAPING` sections.

    Two runs with equal shaping settings (and equal inputs) compute the same thing, wherever their files live,
    whichever MLflow they report to and however fast they run; so this, not the whole slice, keys what a run
    may reuse from another (a training checkpoint, a study's trained teacher).

    Returns:
        A JSON-ready nested mapping, as :func:`params_slice` gives.
    """
    return {key: value for key, value in params_slice(params, step).items() if key not in NOT_SHAPING}
