"""Real low-resolution probes (issue 28): loose detector crops, aligned without landmarks, and the unaligned
protocol that scores them. Real LFW faces; random tiny models where a model is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from crfr.errors import DataError
from crfr.faces.images import read_image
from tests.facedata import image_path, interleaved_pairs, make_params, params_file, require_lfw, save_random_model
from tests.facedata import write_eval_set

# The loose box checks/28 cuts around a deep-funneled LFW face (x0, y0, x1, y1), and brings to 24x33.
CHECK_BOX = (72, 62, 178, 200)
CHECK_ASPECT = 33 / 24


def loose_crop(name: str, number: int, width: int | None = None) -> np.ndarray:
    x0, y0, x1, y1 = CHECK_BOX
    crop = read_image(image_path(name, number))[y0:y1, x0:x1]
    if width is None:
        return crop
    return cv2.resize(crop, (width, round(width * CHECK_ASPECT)), interpolation=cv2.INTER_AREA)


def shift_between(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """How far apart two faces sit (pixels) and how alike they are (phase correlation's peak)."""
    (dx, dy), response = cv2.phaseCorrelate(*(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float64) for f in (a, b)))
    return float(np.hypot(dx, dy)), float(response)


@pytest.mark.parametrize("mode", ["mtcnn", "center-crop"])
def test_a_loose_crop_is_placed_where_landmarks_would_put_it(mode):
    """From its box alone, a loose crop lands within a few pixels of the photo's landmark alignment."""
    require_lfw()
    from crfr.faces.preprocess import prepare_explained

    align = {"mode": mode, "crop_box": [64, 186, 70, 180]}
    for name, number in (("Colin_Powell", 1), ("Serena_Williams", 3), ("Abel_Pacheco", 1)):
        reference, how = prepare_explained(read_image(image_path(name, number)), align)
        assert how == "landmarks (mtcnn)"
        crop = loose_crop(name, number, 24)
        placed, how = prepare_explained(crop, {**align, "landmark_min_px": 100})
        assert how.startswith("box placement (loose 24x33 crop under 100 px"), how
        distance, response = shift_between(reference, placed)
        assert distance < 6 and response > 0.1, (name, distance, response)
        # The default: MTCNN's landmarks in the crop brought up, closer still.
        on_marks, how = prepare_explained(crop, align)
        assert how == "landmarks (mtcnn on the loose 24x33 crop)"
        assert shift_between(reference, on_marks)[0] < 4


def test_a_loose_crop_keeps_its_aspect_ratio():
    """One uniform scale (no stretching), and the same face whatever the crop's pixel count."""
    require_lfw()
    from crfr.faces.placement import place_by_box, placement_matrix

    align = {"mode": "mtcnn"}
    matrix = placement_matrix(24, 33, align, 112, 1.15)
    assert matrix[0, 0] == pytest.approx(matrix[1, 1]) and abs(matrix[0, 1]) + abs(matrix[1, 0]) < 1e-9
    small, large = (place_by_box(loose_crop("Colin_Powell", 1, w), align, 112, 1.15) for w in (48, 96))
    distance, _ = shift_between(small, large)
    assert distance < 1.5
    stretched = place_by_box(cv2.resize(loose_crop("Colin_Powell", 1, 48), (48, 48)), align, 112, 1.15)
    assert np.abs(stretched.astype(int) - small).mean() > np.abs(large.astype(int) - small).mean()


def test_landmarks_are_used_on_a_crop_large_enough():
    require_lfw()
    from crfr.faces.preprocess import prepare_explained

    crop = loose_crop("Colin_Powell", 1, 56)
    _, how = prepare_explained(crop, {"mode": "mtcnn", "landmark_min_px": 40})
    assert how == "landmarks (mtcnn on the loose 56x77 crop)"
    _, how = prepare_explained(crop, {"mode": "mtcnn", "landmark_min_px": 100})
    assert how.startswith("box placement (loose 56x77 crop under 100 px")


def test_square_crops_follow_lr_crops():
    """auto: a square crop is the paper's aligned crop; loose and aligned say so whatever the shape."""
    require_lfw()
    from crfr.faces.preprocess import prepare_explained

    square = cv2.resize(loose_crop("Colin_Powell", 1), (28, 28), interpolation=cv2.INTER_AREA)
    assert prepare_explained(square, {"mode": "mtcnn"})[1].startswith("aligned crop, 28x28")
    assert prepare_explained(square, {"mode": "mtcnn", "lr_crops": "loose"})[1].startswith("landmarks (mtcnn on")
    tall = loose_crop("Colin_Powell", 1, 24)
    assert prepare_explained(tall, {"mode": "mtcnn", "lr_crops": "aligned"})[1].startswith("aligned crop, 24x33")


def test_a_crop_below_the_minimum_is_refused_naming_its_size():
    require_lfw()
    from crfr.faces.preprocess import prepare_explained

    with pytest.raises(DataError, match=r"the face is 9 px across, smaller than the 12 px"):
        prepare_explained(loose_crop("Colin_Powell", 1, 9), {"mode": "mtcnn"}, what="tiny.png")


def test_a_loose_crop_without_a_face_is_refused():
    from crfr.faces.preprocess import prepare_explained

    wall = np.full((33, 24, 3), 120, np.uint8)
    with pytest.raises(DataError, match=r"no face found in wall.png \(taken as a loose 24x33 crop"):
        prepare_explained(wall, {"mode": "mtcnn"}, what="wall.png")


def test_evaluation_places_a_crop_without_a_face_by_its_box_and_calls_it_a_fallback():
    """crfr evaluate scores every probe: where MTCNN finds nothing the box places it, named a fallback."""
    from crfr.faces.preprocess import align_loose

    face, how, found = align_loose(np.full((33, 24, 3), 120, np.uint8), {"mode": "mtcnn"})
    assert found is False and face.shape == (112, 112, 3)
    assert how.startswith("box placement (fallback: MTCNN found no face in the loose 24x33 crop")


def test_verify_json_names_the_alignment_of_each_image(tmp_path):
    require_lfw()
    model = save_random_model(tmp_path / "model", seed=3)
    crop = tmp_path / "crop.png"
    cv2.imwrite(str(crop), cv2.cvtColor(loose_crop("Colin_Powell", 1, 24), cv2.COLOR_RGB2BGR))
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    result = subprocess.run([sys.executable, "-m", "crfr.cli", "verify", "--json", str(crop),
                             str(image_path("Colin_Powell", 2)), "--model", str(model), "--params",
                             str(params_file(tmp_path))], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    crop_how, photo_how = (image["alignment"] for image in out["images"])
    assert crop_how == "landmarks (mtcnn on the loose 24x33 crop)"
    assert photo_how == "landmarks (mtcnn)"
    assert out["probe_px"] == 24 and out["decision"] in ("SAME", "DIFFERENT")


def test_unaligned_boxes_are_seeded_per_row_and_the_same_at_every_size(tmp_path):
    require_lfw()
    from crfr.evaluation.probes import make_probes

    params = make_params(tmp_path)
    images = np.stack([read_image(image_path("Colin_Powell", i))[64:186, 70:180] for i in (1, 2, 3)])
    images = np.stack([cv2.resize(img, (112, 112), interpolation=cv2.INTER_AREA) for img in images])
    small, again = (make_probes(images, "unaligned", 28, params) for _ in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(small, again))
    large = make_probes(images, "unaligned", 56, params)
    for a, b in zip(small, large):
        assert a.shape[1] == 28 and b.shape[1] == 56
        assert abs(b.shape[0] - 2 * a.shape[0]) <= 2  # the same box, brought to another width
        assert 1.1 <= a.shape[0] / a.shape[1] <= 1.55
    assert len({a.shape[0] for a in large}) > 1  # aspect ratios drawn per row
    other = make_probes(images, "unaligned", 28, make_params(tmp_path, ["evaluate.unaligned.seed=7"]))
    assert any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(small, other))


def test_synthesize_writes_and_evaluate_scores_unaligned_at_every_resolution(tmp_path, monkeypatch):
    """The synthesize step stores the crops (heights beside them); evaluate aligns and scores them at every
    resolution, 112 included (a loose crop 112 px wide is not the aligned HR face)."""
    require_lfw()
    import torch

    from components.evaluate import evaluate
    from crfr.evaluation.probes import ProbeSource, make_probes, write_probes

    torch.set_num_threads(2)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prepared = tmp_path / "prepared"
    write_eval_set(prepared, "lfw", interleaved_pairs(fold=10, n=24))
    params = make_params(tmp_path, [
        "evaluate.protocols=[linear, unaligned]", "evaluate.resolutions=[14, 56, 112]", "evaluate.nfolds=2",
        "evaluate.identification=false", "runtime.device=cpu", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location={tmp_path}/mlartifacts"])
    index = write_probes(str(prepared), str(tmp_path / "probes"), params, progress=False)
    assert index["unaligned"]["seed"] == params.evaluate.unaligned.seed
    for size in (14, 56, 112):
        assert (tmp_path / "probes" / "lfw" / "unaligned" / f"{size}.heights.npy").is_file()
    assert not (tmp_path / "probes" / "lfw" / "linear" / "112.npy").exists()
    from crfr.data.pairs import load_pair_set

    data = load_pair_set(prepared / "eval" / "lfw")
    rows = np.arange(len(data.images))
    stored = ProbeSource(tmp_path / "probes", params).get(data, "unaligned", 14, rows)
    made = make_probes(data.images, "unaligned", 14, params, rows)
    assert all(np.array_equal(a, b) for a, b in zip(stored, made))

    models = {"teacher": str(save_random_model(tmp_path / "teacher", seed=1)),
              "student": str(save_random_model(tmp_path / "student", seed=2, backbone="waveresnet"))}
    evaluate(str(prepared), str(tmp_path / "probes"), models, str(tmp_path / "report"), params)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    cells = metrics["student"]["lfw"]
    assert sorted(cells["unaligned"]) >= ["112", "14", "56"]
    assert cells["unaligned"]["112"] != cells["linear"]["112"]  # scored on crops, not the HR short cut
