"""Issue 12: params are finite, in range, strictly typed and validated in every profile; bad inputs (a missing
source, a broken --set, a folder as --params, --top-k -2, a mistyped sqlite URI, unsafe names in pairs.txt)
are clear errors; a training image identical to an evaluation image never reaches training."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crfr.cli import main
from crfr.config import DataCfg, load_params
from crfr.data.formats.lfw import parse_pairs
from crfr.data.prepare import downloads_default_lfw
from crfr.data.shards import ShardDataset
from crfr.errors import ConfigError, DataError
from tests.test_data_prepare import _people, make_lfw_subset

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def crfr(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "crfr.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, **(env or {})})


def config_error(path=PARAMS, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        load_params(path, list(overrides))
    return str(err.value)


# ------------------------------------------------------------------------------------------------ params


@pytest.mark.parametrize(
    "override,message",
    [
        ("seed=-1", "'seed': Input should be greater than or equal to 0"),
        ("teacher.lr=.inf", "'teacher.lr': Input should be a finite number"),
        ("student.lr=.nan", "'student.lr': Input should be a finite number"),
        ("loss.arcface_s=-.inf", "'loss.arcface_s': Input should be a finite number"),
        ("teacher.epochs=1.0e+23", "'teacher.epochs': Input should be a valid integer"),
        ("teacher.epochs=100000000000000000000000", "'teacher.epochs': Input should be less than or equal to 1000"),
        ("teacher.epochs=2.5", "'teacher.epochs': Input should be a valid integer"),
        ("evaluate.far_targets=[0.01, 0]", "'evaluate.far_targets.1': Input should be greater than 0"),
    ],
)
def test_numbers_are_finite_and_in_range(override, message):
    err = config_error(overrides=[override])
    assert message in err and f"--set {override}" in err


@pytest.mark.parametrize(
    "override,key,kind",
    [
        ("teacher.epochs=yes", "teacher.epochs", "integer"),
        ("seed=true", "seed", "integer"),
        ("teacher.lr=on", "teacher.lr", "number"),
        ("student.kd=1", "student.kd", "boolean"),
        ("data.crop_box=[64, 186, 70, yes]", "data.crop_box.3", "integer"),
    ],
)
def test_booleans_and_numbers_do_not_stand_in_for_each_other(override, key, kind):
    err = config_error(overrides=[override])
    assert f"'{key}': Input should be a valid {kind}" in err


def test_epochs_yes_in_the_file_is_refused_naming_the_file(tmp_path):
    text = PARAMS.read_text()
    assert "\n  epochs: 4\n" in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("\n  epochs: 4\n", "\n  epochs: yes\n", 1))
    err = config_error(path)
    assert f"{path}: 'teacher.epochs': Input should be a valid integer (got True)" in err
    assert "booleans" in err and "--set" not in err


def test_yaml_exponents_without_a_dot_still_read_as_numbers():
    # PyYAML (YAML 1.1) reads 1e-3 as a string; refusing it would break the usual way of writing lr.
    assert load_params(PARAMS, ["teacher.lr=1e-3", "teacher.weight_decay=5e-4"]).teacher.lr == pytest.approx(1e-3)


def test_every_profile_is_validated_on_load(tmp_path):
    text = PARAMS.read_text()
    line = "    student: {epochs: 6, milestones: [4, 5]}\n"
    assert line in text  # profiles.long
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(line, "    student: {epochs: 6, milestonez: [4, 5]}\n"))
    err = config_error(path)  # the selected profile is demo: long is not used, and still checked
    assert "profile 'long'" in err and "unknown key 'student.milestonez'" in err
    assert f"{path}, profiles.long" in err
    path.write_text(text.replace(line, "    student: {epochs: 0, milestones: [4, 5]}\n"))
    err = config_error(path, ["profile=tiny"])
    assert "profile 'long'" in err and "'student.epochs': Input should be greater than or equal to 1" in err


def test_errors_say_where_the_value_came_from(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: demo\nteacher: {lr: -1}\n")
    from_file = config_error(path)
    assert f"{path}: 'teacher.lr'" in from_file and "--set" not in from_file
    from_set = config_error(PARAMS, ["student.lr=-2"])
    assert "--set student.lr=-2: 'student.lr'" in from_set and str(PARAMS) not in from_set
    section_check = config_error(PARAMS, ["student.kd=false"])  # a section-level rule broken by one --set
    assert "--set student.kd=false: 'student': wavesim: true needs kd: true" in section_check
    from_profile = tmp_path / "profiled.yaml"
    from_profile.write_text("profile: fast\nprofiles:\n  fast: {teacher: {epochs: 0}}\n")
    assert f"{from_profile}, profiles.fast: 'teacher.epochs'" in config_error(from_profile)


def test_broken_set_and_params_folder_are_one_line_errors(tmp_path):
    for args, needle in [
        (["train", "teacher", "--set", "k=[1,"], "--set 'k=[1,': the value is not valid YAML"),
        (["train", "teacher", "--set", "teacher..lr=1"], "--set 'teacher..lr=1': the key must be dotted names"),
        (["train", "teacher", "--params", str(tmp_path)], f"params file {tmp_path} is a folder"),
        (["data", "prepare", "--params", str(tmp_path), "--out", str(tmp_path / "o")], "is a folder"),
    ]:
        result = crfr(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("crfr: error: ") and needle in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert "params.yaml" not in result.stderr  # a --set or --params mistake is not blamed on params.yaml


def test_top_k_must_be_positive(tmp_path, capsys):
    for bad in ("-2", "0", "two"):
        with pytest.raises(SystemExit) as done:
            main(["identify", "probe.jpg", "--gallery", str(tmp_path), "--top-k", bad])
        assert done.value.code == 2
        assert "argument --top-k: must be" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- sqlite stores


def test_read_only_commands_refuse_a_missing_sqlite_store(tmp_path, lfw_root, monkeypatch):
    from crfr.tracking import setup

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    image = str(lfw_root / "lfw-deepfunneled" / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg")
    no_folder = tmp_path / "tpyo" / "mlflow.db"
    no_file = tmp_path / "mlflow.db"
    common = ["--params", str(PARAMS), "--set", f"tracking.artifact_location={tmp_path}/art"]
    gallery = str(lfw_root / "lfw-deepfunneled" / "Abel_Pacheco")
    every = (["verify", image, image], ["identify", image, "--gallery", gallery], ["embed", image],
             ["promote", "crfr-student", "1"])
    for store, needle, commands in [(no_folder, f"folder {no_folder.parent} does not exist", every),
                                    (no_file, f"file {no_file} does not exist", every[::3])]:
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
        for args in commands:
            result = crfr(*args, *common, env=env)
            assert result.returncode == 2, (args, result.stderr)
            assert needle in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert not no_folder.parent.exists() and not no_file.exists()  # nothing was created
    # Training (tracking.setup) may create the store, folder included; then a read-only command gets
    # the registry's own answer about the empty store.
    params = load_params(PARAMS, [f"tracking.uri=sqlite:///{no_folder}", f"tracking.artifact_location={tmp_path}/a"])
    setup(params.tracking)
    assert no_folder.is_file()
    result = crfr("promote", "crfr-student", "1", *common, env={"MLFLOW_TRACKING_URI": f"sqlite:///{no_folder}"})
    assert result.returncode == 2 and "no registered model named 'crfr-student'" in result.stderr


# ----------------------------------------------------------------------------------------------- sources


def test_missing_source_is_named_and_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.delenv("CRFR_LFW_ROOT", raising=False)
    downloads = tmp_path / "downloads"
    missing = tmp_path / "missing"
    for args, needle in [
        (["--source", str(missing)], f"source {missing} does not exist"),
        (["--set", f"data.root={missing}"], f"LFW root {missing} does not exist (data.root or CRFR_LFW_ROOT"),
    ]:
        result = crfr("data", "prepare", "--params", str(PARAMS), "--set", f"data.download_dir={downloads}",
                      *args, "--out", str(tmp_path / "out"), env={"CRFR_LFW_ROOT": ""})
        assert result.returncode == 2 and needle in result.stderr, result.stderr
        assert "downloading" not in result.stderr and "Traceback" not in result.stderr
        assert not downloads.exists() and not (tmp_path / "out").exists()


def test_only_the_default_data_is_downloaded():
    default = DataCfg()
    assert default.root == "../shared/data/lfw" and downloads_default_lfw(None, default)
    assert not downloads_default_lfw("/missing", default)
    assert not downloads_default_lfw(None, DataCfg(root="/somewhere/else"))
    assert not downloads_default_lfw(None, DataCfg(download=False))


# --------------------------------------------------------------------------------------------- pairs.txt


@pytest.mark.parametrize("name", ["/some/dir/Evil", "../Evil", "Evil\\x", "..", "a/../b"])
@pytest.mark.parametrize("side", ["same", "left", "right"])
def test_pairs_names_must_be_plain_folder_names(tmp_path, name, side):
    lines = ["1\t1", "Abel_Pacheco\t1\t2", "Abel_Pacheco\t1\tAkhmed_Zakayev\t1"]
    if side == "same":
        lines[1] = f"{name}\t1\t2"
    elif side == "left":
        lines[2] = f"{name}\t1\tAkhmed_Zakayev\t1"
    else:
        lines[2] = f"Abel_Pacheco\t1\t{name}\t1"
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        parse_pairs(path)
    line = 2 if side == "same" else 3
    assert f"{path}, line {line}: person name {name!r} must be a plain folder name" in str(err.value)


def test_prepare_refuses_an_absolute_name_outside_the_image_folder(tmp_path, lfw_root, capsys):
    names = _people(lfw_root, 6)
    outside = tmp_path / "some" / "dir"
    outside.mkdir(parents=True)
    for k in (1, 2):  # the files such a name would make prepare read
        shutil.copy(lfw_root / "lfw-deepfunneled" / names[4] / f"{names[4]}_000{k}.jpg", outside / f"Evil_000{k}.jpg")
    text = f"1\t2\n{outside}/Evil\t1\t2\n{names[5]}\t1\t3\n{names[4]}\t1\t{names[5]}\t2\n{names[4]}\t3\t{names[5]}\t1\n"
    root = make_lfw_subset(tmp_path, lfw_root, names[:4], names[4:], text)
    code = main(["data", "prepare", "--params", str(PARAMS), "--source", str(root), "--no-progress",
                 "--set", "data.eval_sets=[{name: lfw, kind: lfw}]", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"pairs.txt, line 2: person name '{outside}/Evil' must be a plain folder name" in err
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------- train/eval copies


def test_an_eval_image_copied_under_a_training_name_is_reported_and_kept_out(tmp_path, lfw_root, capsys):
    names = _people(lfw_root, 6)
    train, evals = names[:4], names[4:]
    root = make_lfw_subset(tmp_path, lfw_root, train, evals)
    # The pairs use evals[0]'s image 1; the same bytes are planted as a picture of a training identity.
    planted = root / "lfw-deepfunneled" / train[0] / f"{train[0]}_0099.jpg"
    shutil.copyfile(lfw_root / "lfw-deepfunneled" / evals[0] / f"{evals[0]}_0001.jpg", planted)
    overrides = ["--set", "data.eval_sets=[{name: lfw, kind: lfw}]", "--set", "data.max_images_per_identity=100",
                 "--set", "data.validation_identities=0"]  # the subset has no one with 2-3 images
    code = main(["data", "prepare", "--params", str(PARAMS), "--source", str(root), *overrides,
                 "--out", str(tmp_path / "out"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warning = [line for line in captured.err.splitlines() if line.startswith("crfr: warning:")]
    assert len(warning) == 1 and "1 training image(s) byte-identical to evaluation images" in warning[0]
    assert f"lfw-deepfunneled/{train[0]}/{train[0]}_0099.jpg = lfw-deepfunneled/{evals[0]}/{evals[0]}_0001.jpg" \
        in warning[0]
    assert "(1 identical to eval images removed)" in captured.out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["train"]["identical_to_eval"]["removed_from_train"] == 1
    assert report["train"]["dropped"]["images_identical_to_eval"] == 1
    # The copy is not in the shards nor in the manifest's training rows: no sha256 is in both splits.
    rows = list(csv.DictReader(open(tmp_path / "out" / "manifest.csv")))
    train_sha = {r["sha256"] for r in rows if r["split"] == "train"}
    eval_sha = {r["sha256"] for r in rows if r["split"].startswith("eval:")}
    assert eval_sha and not train_sha & eval_sha
    assert not any(r["path"].endswith("_0099.jpg") for r in rows)
    real = sum(len(list((lfw_root / "lfw-deepfunneled" / n).glob("*.jpg"))) for n in train)
    ds = ShardDataset(tmp_path / "out" / "train")
    assert len(ds) == report["train"]["images"] == real
    assert np.bincount(ds.labels)[ds.classes.index(train[0])] == len(
        list((lfw_root / "lfw-deepfunneled" / train[0]).glob("*.jpg")))
    # Without the planted copy nothing is reported.
    planted.unlink()
    assert main(["data", "prepare", "--params", str(PARAMS), "--source", str(root), *overrides,
                 "--out", str(tmp_path / "clean"), "--no-progress"]) == 0
    assert "crfr: warning:" not in capsys.readouterr().err
    clean = json.loads((tmp_path / "clean" / "report.json").read_text())
    assert clean["train"]["identical_to_eval"]["removed_from_train"] == 0
