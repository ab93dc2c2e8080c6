"""Model registry and promotion gate against a real sqlite store and a real ``mlflow server``."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest

from crfr.errors import DataError, RegistryError
from crfr.registry.gate import gate, gate_accuracies
from crfr.registry.promote import promote
from crfr.registry.lineage import EVALUATION, DataRef, collect
from crfr.registry.register import register_model
from crfr.registry.resolve import load_embedder
from crfr.registry.versions import CHALLENGER, CHAMPION, PREVIOUS
from tests.facedata import (
    free_port,
    load_face,
    make_params,
    params_file,
    require_lfw,
    running_mlflow_server,
    save_random_model,
)

THRESHOLDS = {"14": 1.31, "28": 1.22, "112": 1.15}
PAIRS = 600


def decisions(acc: dict[str, float], pairs: int = PAIRS) -> dict[str, np.ndarray]:
    """Per-pair right/wrong decisions with these accuracies, right on the first pairs: of two such models the
    more accurate one is right wherever the other is (a gain no resampling can explain away)."""
    return {r: np.arange(pairs) < round(a / 100 * pairs) for r, a in acc.items()}


def register_measured(model_dir, acc: dict[str, float], params, data: str = "lfw-pairs-0001", outcomes=None):
    """Register as the register step does: accuracies, the gate set's fingerprint and the per-pair decisions."""
    record = collect(model_dir, params)
    record.datasets = [DataRef("eval:lfw", data, "/data/lfw", EVALUATION)]
    return register_model(model_dir, acc, THRESHOLDS, params, lineage=record,
                          outcomes=decisions(acc) if outcomes is None else outcomes)


# ---------------------------------------------------------------------------------------------- the gate


def test_gate_without_champion_promotes():
    d = gate({"14": 70.0, "112": 80.0}, None)
    assert d.promote and "no champion" in d.reasons[0]


def test_gate_blocks_lower_mean_and_large_drop_and_passes_better():
    champion = {"14": 70.0, "28": 75.0, "112": 80.0}
    worse = gate({"14": 69.0, "28": 74.0, "112": 79.5}, champion, min_improvement=0.0, max_drop=1.0)
    assert not worse.promote and any("mean" in r for r in worse.reasons)
    dropped = gate({"14": 78.0, "28": 76.0, "112": 78.5}, champion, min_improvement=0.0, max_drop=1.0)
    assert not dropped.promote and any("112 px" in r and "max_drop" in r for r in dropped.reasons)
    better = gate({"14": 72.0, "28": 75.5, "112": 79.5}, champion, min_improvement=0.5, max_drop=1.0)
    assert better.promote and better.gain == pytest.approx(2.0 / 3, abs=1e-3)
    assert [row["resolution"] for row in better.comparison] == ["14", "28", "112", "mean"]
    assert "| 14 | 70.00 | 72.00 | +2.00 | yes |" in better.table_markdown()
    needs_more = gate({"14": 72.0, "28": 75.5, "112": 79.5}, champion, min_improvement=1.0, max_drop=1.0)
    assert not needs_more.promote


def test_gate_blocks_candidate_missing_a_resolution():
    d = gate({"112": 90.0}, {"14": 70.0, "112": 80.0})
    assert not d.promote and any("14 px" in r for r in d.reasons)


def test_gate_accuracies_from_evaluate_metrics(tmp_path):
    params = make_params(tmp_path)
    metrics = {"lfw": {"linear": {"14": {"acc": 70.0}, "112": {"acc": 80.0}, "mean": {"acc": 75.0}},
                       "realistic": {"14": {"acc": 60.0}}}}
    assert gate_accuracies(metrics, params.registry) == {"14": 70.0, "112": 80.0}
    with pytest.raises(RegistryError, match="lfw/linear"):
        gate_accuracies({"agedb": {}}, params.registry)


# ---------------------------------------------------------------------------------------------- backends


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a sqlite store and proxied artifacts, for this session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(root, str(root / "artifacts")) as url:
        yield url


@pytest.fixture(params=["sqlite", "server"])
def backend(request, tmp_path, monkeypatch):
    """Params pointing at a fresh registry (unique model names), for both kinds of tracking store."""
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path}/mlflow.db"
    else:
        uri = request.getfixturevalue("mlflow_server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tag = uuid.uuid4().hex[:8]
    params = make_params(tmp_path, [
        f"tracking.artifact_location={tmp_path}/mlartifacts",
        f"registry.student_name=crfr-student-{tag}",
        f"registry.teacher_name=crfr-teacher-{tag}",
        "registry.min_improvement=0.0",
        "registry.max_drop=1.0",
    ])
    return params, tmp_path


def metrics_for(acc: dict[str, float]) -> dict:
    """An evaluate ``metrics.json`` entry with these gate accuracies."""
    return {"lfw": {"linear": {r: {"acc": a, "std": 1.0} for r, a in acc.items()}}}


def test_register_gate_promote_and_load_by_alias(backend):
    from mlflow import MlflowClient

    params, tmp = backend
    name = params.registry.student_name
    first = save_random_model(tmp / "m1", seed=1, backbone="waveresnet")
    record = collect(first, params)
    record.datasets = [DataRef("eval:lfw", "lfw-pairs-0001", "/data/lfw", EVALUATION)]
    v1 = register_model(first, metrics_for({"14": 70.0, "28": 75.0, "112": 80.0}), THRESHOLDS, params,
                        lineage=record, outcomes=decisions({"14": 70.0, "28": 75.0, "112": 80.0}))
    assert str(v1.version) == "1" and CHALLENGER in v1.aliases
    # A LoggedModel, its evaluation accuracies logged on it and linked to the evaluation set they measure.
    import mlflow

    logged = {m.key: m for m in mlflow.get_logged_model(v1.tags["logged_model_id"]).metrics}
    assert logged["acc_lfw_linear_14"].value == 70.0 and logged["acc_lfw_linear_14"].dataset_digest == "lfw-pairs-0001"
    assert "crfr student" in v1.description and "Gate evidence: lfw data lfw-pairs-0001" in v1.description
    assert json.loads(v1.tags["accuracies"]) == {"14": 70.0, "28": 75.0, "112": 80.0}
    d1 = promote(name, v1.version, params)
    assert d1.promote and d1.outcome == "promoted"

    # A worse model: registered as challenger, but the gate keeps the champion.
    worse = register_measured(save_random_model(tmp / "m2", seed=2, backbone="waveresnet"),
                              {"14": 69.0, "28": 74.5, "112": 78.0}, params)
    d2 = promote(name, CHALLENGER, params)
    assert not d2.promote and d2.outcome == "blocked" and d2.champion_version == "1"
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == str(worse.version)
    assert client.get_model_version(name, worse.version).tags["gate.outcome"] == "blocked"

    # A better one passes.
    better = register_measured(save_random_model(tmp / "m3", seed=3, backbone="waveresnet"),
                               {"14": 73.0, "28": 75.5, "112": 80.0}, params)
    d3 = promote(name, better.version, params)
    assert d3.promote and d3.outcome == "promoted" and d3.gain > 0, d3.reasons
    assert any("paired 95% interval" in r for r in d3.reasons)
    described = client.get_model_version(name, better.version).description
    assert "Gate accuracies on lfw/linear" in described and "promoted against champion version 1" in described
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == str(better.version)
    assert str(client.get_model_version_by_alias(name, PREVIOUS).version) == "1"

    # Load the champion back and embed a real face; it is model m3, preprocessing included.
    require_lfw()
    embedder = load_embedder(f"models:/{name}@{CHAMPION}", params)
    face = load_face("Abel_Pacheco", 1)
    emb = embedder.embed([face, face[::4, ::4]])
    assert emb.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    from crfr.serve.embedder import FaceEmbedder

    local = FaceEmbedder.from_dir(tmp / "m3").embed([face])
    np.testing.assert_allclose(emb[0], local[0], atol=1e-5)
    assert embedder.threshold_for(28) == ("28", 1.22) and embedder.threshold_for(250) == ("112", 1.15)

    # The plain MLflow route gives the same embeddings from encoded bytes.
    import cv2
    import mlflow.pyfunc
    import pandas as pd

    jpeg = cv2.imencode(".png", cv2.cvtColor(face, cv2.COLOR_RGB2BGR))[1].tobytes()
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    out = np.asarray(pyfunc.predict(pd.DataFrame({"image": [jpeg]})))
    np.testing.assert_allclose(out[0], local[0], atol=1e-5)
    assert pyfunc.metadata.metadata["thresholds"] == THRESHOLDS


def test_the_gate_refuses_a_champion_measured_on_other_data(backend):
    from mlflow import MlflowClient

    params, tmp = backend
    name = params.registry.student_name
    v1 = register_measured(save_random_model(tmp / "a", seed=1), {"14": 70.0, "112": 80.0}, params)
    assert promote(name, v1.version, params).promote
    other = register_measured(save_random_model(tmp / "b", seed=2), {"14": 90.0, "112": 95.0}, params,
                              data="lfw-pairs-0002")
    decision = promote(name, other.version, params)
    assert not decision.promote
    assert "other evidence" in decision.reasons[0] and "lfw-pairs-0001 vs lfw-pairs-0002" in decision.reasons[0]
    assert str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version) == str(v1.version)
    # Registered without evidence (not through the register step): refused too, never compared on faith.
    bare = register_model(save_random_model(tmp / "c", seed=3), {"14": 90.0, "112": 95.0}, THRESHOLDS, params)
    decision = promote(name, bare.version, params)
    assert not decision.promote and "records no gate evidence" in decision.reasons[0]


def test_a_gain_within_the_noise_of_the_paired_interval_is_refused(backend):
    params, tmp = backend
    name = params.registry.student_name
    champ = {r: np.arange(PAIRS) < 480 for r in ("14", "112")}  # 80.0%
    v1 = register_measured(save_random_model(tmp / "a", seed=1), {"14": 80.0, "112": 80.0}, params, outcomes=champ)
    assert promote(name, v1.version, params).promote
    # +0.5 points: 12 pairs newly right and 9 newly wrong at each resolution. The point estimate clears
    # min_improvement 0; the paired interval's lower bound does not.
    noisy = {r: a.copy() for r, a in champ.items()}
    for a in noisy.values():
        a[480:492], a[0:9] = True, False
    cand = register_measured(save_random_model(tmp / "b", seed=2), {"14": 80.5, "112": 80.5}, params, outcomes=noisy)
    decision = promote(name, cand.version, params)
    assert not decision.promote and decision.gain == pytest.approx(0.5), decision.reasons
    assert "paired 95% interval of the gain [-" in decision.reasons[0]


def test_force_is_recorded(backend):
    from mlflow import MlflowClient

    params, tmp = backend
    name = params.registry.student_name
    model = save_random_model(tmp / "m", seed=4)
    v1 = register_model(model, {"14": 80.0, "112": 90.0}, THRESHOLDS, params)
    promote(name, v1.version, params)
    v2 = register_model(model, {"14": 60.0, "112": 70.0}, THRESHOLDS, params)
    decision = promote(name, v2.version, params, force=True)
    assert decision.promote and decision.forced and decision.outcome == "forced"
    version = MlflowClient().get_model_version(name, v2.version)
    assert version.tags["gate.outcome"] == "forced" and CHAMPION in version.aliases


def test_unknown_names_are_registry_errors(backend):
    from crfr.tracking import setup

    params, tmp = backend
    name = params.registry.student_name
    setup(params.tracking)  # an existing, empty store: read-only commands refuse one that does not exist
    with pytest.raises(RegistryError, match="no registered model named"):
        promote("no-such-model", "1", params)
    with pytest.raises(RegistryError, match="no registered model named"):
        load_embedder("models:/no-such-model@champion", params)
    register_model(save_random_model(tmp / "m", seed=5), {"14": 80.0}, THRESHOLDS, params)
    with pytest.raises(RegistryError, match="has no alias 'champion'"):
        load_embedder(f"models:/{name}@{CHAMPION}", params)  # registered, never promoted
    with pytest.raises(RegistryError, match="has no version '7'"):
        promote(name, "7", params)
    with pytest.raises(RegistryError, match="has no alias 'nope'"):
        promote(name, "nope", params)


# ---------------------------------------------------------------------------------------------- sqlite only


def test_register_component_writes_registration(tmp_path, monkeypatch):
    from components.register import register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    params = make_params(tmp_path, [f"tracking.artifact_location={tmp_path}/art"])
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"student": metrics_for({"14": 70.0, "112": 80.0})}))
    (evaluation / "thresholds.json").write_text(json.dumps(
        {"dataset": "lfw", "protocol": "linear", "models": {"student": {"14": 1.3, "112": 1.1}}}))
    model = save_random_model(tmp_path / "model", seed=6, backbone="waveresnet")
    with pytest.raises(DataError, match="outcomes.npz is missing: re-run the evaluate step"):
        register(str(model), str(evaluation), str(tmp_path / "out"), params)
    np.savez(evaluation / "outcomes.npz", **{f"student/lfw/linear/{r}": v for r, v in
                                             decisions({"14": 70.0, "112": 80.0}).items()})
    result = register(str(model), str(evaluation), str(tmp_path / "out"), params)
    saved = json.loads((tmp_path / "out" / "registration.json").read_text())
    assert saved == result
    assert saved["name"] == "crfr-student" and saved["version"] == "1"
    assert set(saved["aliases"]) == {CHALLENGER, CHAMPION}
    assert saved["decision"]["outcome"] == "promoted" and saved["thresholds"] == {"14": 1.3, "112": 1.1}


def test_cli_promote_exit_codes(tmp_path, monkeypatch, capsys):
    from crfr.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    params = make_params(tmp_path, [f"tracking.artifact_location={tmp_path}/art"])
    model = save_random_model(tmp_path / "m", seed=7)
    register_model(model, {"14": 80.0, "112": 90.0}, THRESHOLDS, params)
    register_model(model, {"14": 70.0, "112": 90.0}, THRESHOLDS, params)
    common = ["--params", str(params_file(tmp_path)), "--set", f"tracking.artifact_location={tmp_path}/art"]
    assert main(["promote", "crfr-student", "1", *common]) == 0
    assert "PROMOTED" in capsys.readouterr().out
    assert main(["promote", "crfr-student", "2", *common]) == 1  # the gate blocks
    out = capsys.readouterr().out
    assert "BLOCKED" in out and "| 14 | 80.00 | 70.00 | -10.00 | NO |" in out
    assert main(["promote", "crfr-student", "9", *common]) == 2
    err = capsys.readouterr().err
    assert "has no version '9'" in err and "Traceback" not in err


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    params = make_params(tmp_path)
    start = time.monotonic()
    with pytest.raises(RegistryError, match="not reachable"):
        promote("crfr-student", "1", params)
    with pytest.raises(RegistryError, match="not reachable"):
        load_embedder("models:/crfr-student@champion", params)
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("in_experiments", [False, True])
def test_dvc_experiments_register_only_when_asked(tmp_path, monkeypatch, capsys, in_experiments):
    from components.register import main

    monkeypatch.setenv("DVC_EXP_NAME", "sappy-tuna")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "register"
    code = main(["--params", "params.yaml", "--set", f"registry.in_experiments={str(in_experiments).lower()}",
                 "--model", str(tmp_path / "no-model"), "--eval", str(tmp_path / "no-eval"), "--out", str(out)])
    if in_experiments:  # asked: it goes on to register, and stops at the missing evaluation
        assert code != 0 and not out.exists()
        assert "no-eval" in capsys.readouterr().err
    else:
        assert code == 0
        record = json.loads((out / "registration.json").read_text())
        assert record["registered"] is False and record["experiment"] == "sappy-tuna"
        assert "registry.in_experiments=true" in capsys.readouterr().out
