"""``crfr verify`` / ``embed`` / ``identify`` with a local model dir, and their handling of bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from crfr.cli import main
from tests.facedata import image_path, load_face, params_file, require_lfw, save_random_model

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    require_lfw()
    return save_random_model(tmp_path_factory.mktemp("cli") / "model", seed=21, backbone="waveresnet")


def crfr(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.run([sys.executable, "-m", "crfr.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def parse(out: str) -> tuple[float, float, str]:
    distance = float(re.search(r"distance (\d+\.\d+)", out).group(1))
    threshold = float(re.search(r"threshold: (\d+\.\d+)", out).group(1))
    decision = re.search(r"decision: (SAME|DIFFERENT)", out).group(1)
    return distance, threshold, decision


def test_verify_same_and_different_people(model_dir, tmp_path):
    params = str(params_file(tmp_path))
    same = crfr("verify", str(image_path("Abel_Pacheco", 1)), str(image_path("Abel_Pacheco", 4)),
                "--model", str(model_dir), "--params", params)
    assert same.returncode == 0, same.stderr
    d_same, threshold, decision = parse(same.stdout)
    assert 0.0 <= d_same <= 4.0 and decision == ("SAME" if d_same < threshold else "DIFFERENT")
    diff = crfr("verify", str(image_path("Abel_Pacheco", 1)), str(image_path("Akhmed_Zakayev", 1)),
                "--model", str(model_dir), "--params", params)
    assert diff.returncode == 0, diff.stderr
    d_diff, _, decision = parse(diff.stdout)
    assert decision == ("SAME" if d_diff < threshold else "DIFFERENT")
    assert "250 px probe" in same.stdout and "Traceback" not in same.stderr + diff.stderr


def test_bad_image_path_is_a_clear_error(model_dir, tmp_path):
    missing = tmp_path / "no_such_face.jpg"
    result = crfr("verify", str(missing), str(image_path("Abel_Pacheco", 1)), "--model", str(model_dir),
                  "--params", str(params_file(tmp_path)))
    assert result.returncode != 0
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_corrupt_image_and_missing_model_are_clear_errors(model_dir, tmp_path, capsys):
    params = str(params_file(tmp_path))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 definitely not a jpeg")
    good = str(image_path("Abel_Pacheco", 1))
    assert main(["verify", good, str(corrupt), "--model", str(model_dir), "--params", params]) == 2
    assert str(corrupt) in capsys.readouterr().err
    assert main(["verify", good, good, "--model", str(tmp_path / "nothing"), "--params", params]) == 2
    assert "nothing" in capsys.readouterr().err


def test_unknown_alias_is_a_clear_error(model_dir, tmp_path, monkeypatch, capsys):
    from crfr.config import load_params
    from crfr.tracking import setup

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    good = str(image_path("Abel_Pacheco", 1))
    params = str(params_file(tmp_path))
    # An existing, empty store (verify refuses one that does not exist: tests/test_params_and_inputs.py).
    setup(load_params(params, [f"tracking.artifact_location={tmp_path}/art"]).tracking)
    code = main(["verify", good, good, "--model", "models:/crfr-student@champion", "--params", params,
                 "--set", f"tracking.artifact_location={tmp_path}/art"])
    err = capsys.readouterr().err
    assert code == 2 and "no registered model named 'crfr-student'" in err and "Traceback" not in err


def test_threshold_follows_probe_resolution(model_dir, tmp_path, capsys):
    calibrated = tmp_path / "calibrated"
    shutil.copytree(model_dir, calibrated)
    (calibrated / "thresholds.json").write_text(json.dumps({"14": 1.5, "28": 1.2, "112": 0.5}))
    small = tmp_path / "small.png"
    face = load_face("Abel_Pacheco", 1)
    cv2.imwrite(str(small), cv2.cvtColor(cv2.resize(face, (16, 16), interpolation=cv2.INTER_LINEAR),
                                         cv2.COLOR_RGB2BGR))
    params = str(params_file(tmp_path))
    assert main(["verify", str(small), str(image_path("Abel_Pacheco", 4)), "--model", str(calibrated),
                 "--params", params]) == 0
    out = capsys.readouterr().out
    assert "threshold: 1.5000 for a 16 px probe (calibrated at 14 px)" in out
    assert main(["verify", str(image_path("Abel_Pacheco", 1)), str(image_path("Abel_Pacheco", 4)),
                 "--model", str(calibrated), "--params", params]) == 0
    assert "threshold: 0.5000 for a 250 px probe (calibrated at 112 px)" in capsys.readouterr().out


def test_embed_and_identify(model_dir, tmp_path, capsys):
    params = str(params_file(tmp_path))
    files = [str(image_path("Abel_Pacheco", 1)), str(image_path("Akhmed_Zakayev", 1))]
    out = tmp_path / "emb.npy"
    assert main(["embed", *files, "--model", str(model_dir), "--out", str(out), "--params", params]) == 0
    emb = np.load(out)
    assert emb.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    gallery = tmp_path / "gallery"
    (gallery / "Abel_Pacheco").mkdir(parents=True)
    shutil.copy(image_path("Abel_Pacheco", 2), gallery / "Abel_Pacheco")
    shutil.copy(image_path("Abel_Pacheco", 3), gallery / "Abel_Pacheco")
    shutil.copy(image_path("Akhmed_Zakayev", 2), gallery / "Akhmed_Zakayev.jpg")
    (gallery / "broken.jpg").write_bytes(b"junk")
    capsys.readouterr()
    assert main(["identify", files[0], "--gallery", str(gallery), "--top-k", "5", "--model", str(model_dir),
                 "--params", params]) == 0
    captured = capsys.readouterr()
    ranked = [line.split()[1] for line in captured.out.splitlines() if re.match(r"\s+\d+\s", line)]
    assert sorted(ranked) == ["Abel_Pacheco", "Akhmed_Zakayev"]  # two identities; the broken file is skipped
    assert "broken.jpg" in captured.err
