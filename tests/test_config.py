"""params.yaml: profiles, overrides and errors that name the key."""

import pytest
import yaml

from crfr.config import REPO_PARAMS_KEYS, Params, load_params, params_from_json
from crfr.errors import ConfigError


def test_repo_params_validate_for_every_profile():
    raw = yaml.safe_load(open("params.yaml"))
    assert set(raw) == REPO_PARAMS_KEYS
    for profile in raw["profiles"]:
        assert load_params("params.yaml", [f"profile={profile}"]).profile == profile


@pytest.mark.parametrize("teacher", [{"source": "onnx", "onnx": "/models/face.onnx"}, {"source": "dlib"}])
def test_every_profile_loads_over_any_top_level_teacher(tmp_path, teacher):
    # Every profile is validated on load: one that names its own teacher must not clash with the file's.
    raw = yaml.safe_load(open("params.yaml"))
    raw["teacher"].update(teacher)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_params(path).teacher.source == teacher["source"]
    external = load_params(path, ["profile=external"])
    assert (external.teacher.source, external.teacher.onnx, external.loss.lambda_match) == ("dlib", None, 1.0)


def test_paper_profile_is_the_papers_setting():
    p = load_params("params.yaml", ["profile=paper"])
    assert (p.model.depth, p.model.width, p.model.embedding_size) == (50, 1.0, 512)
    assert (p.teacher.epochs, p.teacher.batch_size, p.teacher.lr, p.teacher.milestones) == (18, 128, 0.1, [10, 13, 16])
    assert (p.loss.lambda1, p.loss.lambda2, p.loss.arcface_s, p.loss.arcface_m) == (1.0, 0.05, 64.0, 0.5)
    assert [s.name for s in p.data.eval_sets] == ["lfw", "agedb_30", "cplfw", "calfw"]
    # As written: no warmup, 18 epochs from scratch for the student and each of the five Table I rows.
    assert (p.teacher.warmup_epochs, p.student.warmup_epochs, p.student.init_from_teacher) == (0.0, 0.0, False)
    assert p.ablation_rows == ["resnet", "waveresnet", "degradation", "kd", "wavesim"]
    for row in p.ablation_rows:
        st = p.student_for_row(row)
        assert (st.epochs, st.batch_size, st.lr, st.milestones, st.gamma) == (18, 128, 0.1, [10, 13, 16], 0.1)
    # Where the paper is silent: insightface's defaults, named in docs/paper.md.
    assert (p.teacher.momentum, p.teacher.weight_decay, p.model.zero_init_residual) == (0.9, 5e-4, False)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_wavesim_reduction_takes_mean_or_sum_only(reduction):
    assert load_params("params.yaml", [f"loss.wavesim_reduction={reduction}"]).loss.wavesim_reduction == reduction
    with pytest.raises(ConfigError, match="'loss.wavesim_reduction': Input should be 'mean' or 'sum'"):
        load_params("params.yaml", ["loss.wavesim_reduction=max"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.align=foo", "'data.align': Input should be 'mtcnn', 'center-crop' or 'none'"),
        ("model.depth=20", "'model.depth': Input should be 18, 34, 50 or 100"),
        ("teacher.lr=-1", "'teacher.lr': Input should be greater than 0"),
        ("data.bogus=1", "unknown key 'data.bogus'; allowed keys here: align,"),
        ("degrade.p_blur=2", "'degrade.p_blur': Input should be less than or equal to 1"),
        ("model.wavelet=nope", "'model.wavelet': unknown wavelet 'nope'"),
        ("teacher.epochs=two", "'teacher.epochs': Input should be a valid integer"),
        ("student.wavesim=true", None),
    ],
)
def test_bad_values_name_the_key(override, message):
    if message is None:
        assert load_params("params.yaml", [override]).student.wavesim
        return
    with pytest.raises(ConfigError) as err:
        load_params("params.yaml", [override])
    assert message in str(err.value)


def test_unknown_profile_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"profile 'x' is not defined; allowed: \['demo', 'evidence', 'external', 'long', 'paper', 'tiny'\]"):
        load_params("params.yaml", ["profile=x"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("teacher: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("CRFR_LFW_ROOT", "/data/lfw")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    p = load_params("params.yaml")
    assert p.data.root == "/data/lfw" and p.tracking.uri == "http://mlflow:5000"


def test_ablation_rows_and_json_round_trip():
    p = load_params("params.yaml")
    row = p.student_for_row("waveresnet")
    assert (row.backbone, row.lr_data, row.kd, row.wavesim) == ("waveresnet", "bicubic", False, False)
    assert p.student_for_row("default") == p.student
    with pytest.raises(ConfigError, match="ablation row 'x'"):
        p.student_for_row("x")
    assert params_from_json(p.model_dump_json()) == p
    assert isinstance(p, Params) and p.flat()["model.depth"] == 18


def test_every_table_row_has_the_student_budget_unless_it_asks_for_the_teacher_schedule():
    from components.distill_student import student_spec

    p = load_params("params.yaml", ["teacher.epochs=7", "teacher.lr=0.2", "student.epochs=3"])
    specs = {row: student_spec(p, "models/teacher", row) for row in p.ablation}
    # Same start, same epochs for all five rows: they differ only in backbone, LR data and losses.
    assert {(s.optim.epochs, s.optim.lr, s.init_from_teacher) for s in specs.values()} == {(3, p.student.lr, True)}
    assert specs["resnet"].backbone == "iresnet" and specs["resnet"].lr_data == "bicubic" and not specs["resnet"].kd
    own = load_params("params.yaml", ["teacher.epochs=7", "teacher.lr=0.2", "ablation.resnet.schedule=teacher"])
    scratch = own.student_for_row("resnet")
    assert (scratch.epochs, scratch.lr, scratch.warmup_epochs, scratch.milestones) == (
        7, 0.2, own.teacher.warmup_epochs, own.teacher.milestones)
    assert scratch.backbone == "iresnet" and scratch.lr_data == "bicubic"  # the row's own switches stay
    with pytest.raises(ConfigError, match="schedule"):
        load_params("params.yaml", ["ablation.kd.schedule=mentor"])


def test_wavesim_without_kd_is_rejected():
    with pytest.raises(ConfigError, match="wavesim: true needs kd: true"):
        load_params("params.yaml", ["student.kd=false"])


@pytest.mark.parametrize("entry, message", [
    ("{name: b, kind: bin}", "kind bin needs a path"),
    ("{name: c, kind: csv}", "kind csv needs a path"),
    ("{name: f, kind: cfp, path: x}", "kind cfp needs protocol"),
    ("{name: l, kind: lfw, protocol: FF}", "protocol applies to kind cfp only"),
])
def test_eval_set_kinds_name_what_they_lack(entry, message):
    """Refused on load, naming the set, so prepare never meets a set it cannot read."""
    with pytest.raises(ConfigError, match=message):
        load_params("params.yaml", [f"data.eval_sets=[{entry}]"])
