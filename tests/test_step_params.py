"""The step table (crfr/config/steps.py) and dvc.yaml's stage params agree, by the rule its docstring states."""

from __future__ import annotations

import json

import pytest
import yaml

from crfr.config import Params, load_params
from crfr.config.steps import ALL, NOT_SHAPING, ROWS, STEP_PARAMS, TEACHER_SCHEDULE, shaping_settings, slice_json
from tests.pipeline_support import REPO

PROFILE_KEYS = {"profile", "profiles.${profile}"}
# Where bytes go, not what a step computes: a DVC stage may list these or not. runtime stays required.
WHERE_BYTES_GO = {key for key in NOT_SHAPING if key != "runtime"}
# DVC's evaluate finds the rows' models by ablation_rows in its --models-dir; a kfp task is handed them.
DVC_ONLY = {"evaluate": {"ablation_rows"}}


def dvc_stage_params() -> dict[str, set[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        entries = stage.get("do", stage).get("params", [])
        assert all(isinstance(e, str) for e in entries), f"{name}: params of another file than params.yaml"
        out[name] = set(entries)
    return out


def table_keys(step: str) -> tuple[set[str], set[str]]:
    """(keys the DVC stage must list, keys it may list) for ``step``."""
    keys = {"ablation" if k == ROWS else "teacher" if k == TEACHER_SCHEDULE else k for k in STEP_PARAMS[step]}
    optional = {k for k in keys if k.split(".")[0] in WHERE_BYTES_GO}
    return (keys - optional) | PROFILE_KEYS | DVC_ONLY.get(step, set()), optional


def is_params_key(dotted: str) -> bool:
    model = Params
    for part in dotted.split("."):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        model = field.annotation
    return True


def test_dvc_has_a_stage_for_every_step():
    assert set(dvc_stage_params()) == set(STEP_PARAMS)


@pytest.mark.parametrize("step", sorted(STEP_PARAMS))
def test_dvc_stage_params_match_the_step_table(step):
    listed = dvc_stage_params()[step]
    assert all(is_params_key(k) for k in listed - PROFILE_KEYS), f"{step}: {sorted(listed)} names unknown keys"
    if STEP_PARAMS[step] == (ALL,):
        # It reads everything to record it; DVC lists only what steers it.
        assert PROFILE_KEYS <= listed
        return
    required, optional = table_keys(step)
    assert not required - listed, f"dvc.yaml stage {step} lacks params {sorted(required - listed)}"
    assert not listed - required - optional, (
        f"dvc.yaml stage {step} lists params its step does not read: {sorted(listed - required - optional)}")


def test_shaping_settings_are_the_slice_without_where_and_how_fast():
    params = load_params(REPO / "params.yaml", ["ablation_rows=[resnet]", "ablation.resnet.schedule=teacher"])
    for step in STEP_PARAMS:
        shaping = shaping_settings(params, step)
        full = json.loads(slice_json(params, step))
        assert not set(shaping) & set(NOT_SHAPING)
        assert shaping == {k: v for k, v in full.items() if k not in NOT_SHAPING}, step
    assert set(shaping_settings(params, "distill_row")["ablation"]) == {"resnet"}
    assert "teacher" in shaping_settings(params, "distill_row")
    moved = params.model_copy(update={"run_dir": "elsewhere"})
    assert shaping_settings(moved, "train_teacher") == shaping_settings(params, "train_teacher")
