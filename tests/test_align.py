"""Alignment: the similarity fit, centre crops, and MTCNN (own networks on facenet-pytorch's weight files)."""

from __future__ import annotations

import importlib.metadata
import math

import cv2
import numpy as np
import pytest

from crfr.config import DataCfg
from crfr.errors import DataError
from crfr.faces.align import ARCFACE_TEMPLATE, Aligner, center_crop, similarity_transform
from crfr.faces.detect import pick_face
from crfr.faces.images import read_image


def _mtcnn_available() -> bool:
    try:
        from crfr.faces.mtcnn import weights_dir

        weights_dir()
        return True
    except DataError:
        return False


needs_weights = pytest.mark.skipif(
    not _mtcnn_available(), reason="MTCNN weights absent: pip install --no-deps facenet-pytorch==2.6.0"
)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_similarity_transform_recovers_a_known_similarity():
    angle, scale, shift = math.radians(17), 1.7, np.array([12.0, -5.0])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    src = ARCFACE_TEMPLATE
    dst = src @ (scale * rot).T + shift
    matrix = similarity_transform(src, dst)
    assert np.allclose(matrix[:, :2], scale * rot, atol=1e-9) and np.allclose(matrix[:, 2], shift, atol=1e-9)
    # A mirrored point set cannot be matched by a similarity: the fit must stay a proper rotation.
    mirrored = dst * np.array([-1.0, 1.0])
    m = similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_center_crop_uses_the_box_and_falls_back_to_a_central_square():
    img = np.zeros((250, 250, 3), np.uint8)
    img[64:186, 70:180] = 200
    face, fits = center_crop(img, (64, 186, 70, 180), 112)
    assert fits and face.shape == (112, 112, 3) and (face == 200).all()
    small = np.zeros((100, 120, 3), np.uint8)
    small[:, 10:110] = 50
    face, fits = center_crop(small, (64, 186, 70, 180), 112)
    assert not fits and face.shape == (112, 112, 3) and (face == 50).all()
    aligner = Aligner(DataCfg(align="center-crop"))
    aligner([img, small])
    assert aligner.stats.crop_box_outside == 1 and aligner.stats.aligned == 2


def test_none_mode_keeps_aligned_images_and_resizes_others():
    aligner = Aligner(DataCfg(align="none"))
    a = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    out = aligner([a, np.zeros((120, 96, 3), np.uint8)])
    assert out[0] is a and out[1].shape == (112, 112, 3) and aligner.stats.resized == 1


def test_pick_face_prefers_large_central_faces():
    boxes = np.array([[0, 0, 60, 60, 0.99], [90, 90, 160, 160, 0.9], [100, 100, 130, 130, 0.99]], float)
    assert pick_face(boxes, (250, 250)) == 1


@needs_weights
def test_weight_files_are_read_without_importing_facenet_pytorch():
    import sys

    from crfr.faces.mtcnn import MTCNN

    MTCNN()
    assert "facenet_pytorch" not in sys.modules
    dist = importlib.metadata.distribution("facenet-pytorch")
    assert dist.version == "2.6.0"


def test_missing_weights_are_a_clear_error(monkeypatch, tmp_path):
    from crfr.faces import mtcnn

    monkeypatch.setenv(mtcnn.WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(DataError, match=r"MTCNN weights \['pnet.pt', 'rnet.pt', 'onet.pt'\] not found"):
        mtcnn.weights_dir()
    monkeypatch.delenv(mtcnn.WEIGHTS_ENV)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(mtcnn.importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match="pip install --no-deps facenet-pytorch==2.6.0"):
        mtcnn.weights_dir()


@needs_weights
def test_mtcnn_finds_faces_and_landmarks_on_lfw(lfw_root):
    from crfr.faces.mtcnn import MTCNN

    names = [("Aaron_Eckhart", 1), ("Abba_Eban", 1), ("Aaron_Peirsol", 2), ("Colin_Powell", 5)]
    images = [read_image(lfw_root / "lfw-deepfunneled" / n / f"{n}_{i:04d}.jpg") for n, i in names]
    results = MTCNN(min_face=31).detect(images)
    for (boxes, marks), img in zip(results, images):
        assert len(boxes) >= 1
        k = pick_face(boxes, img.shape)
        b, m = boxes[k], marks[k]
        assert b[4] > 0.95
        assert 60 < (b[0] + b[2]) / 2 < 190 and 60 < (b[1] + b[3]) / 2 < 190  # deep-funneled: roughly centred
        (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = m
        assert lx < nx < rx and mlx < mrx  # image left eye is left of the nose, which is left of the right eye
        assert max(ly, ry) < ny < min(mly, mry)  # eyes above the nose tip above the mouth corners
        assert b[0] <= lx and rx <= b[2] and b[1] <= ly and mly <= b[3]


@needs_weights
def test_mtcnn_alignment_puts_landmarks_on_the_template(lfw_root):
    from crfr.faces.mtcnn import MTCNN

    files = sorted((lfw_root / "lfw-deepfunneled" / "Aaron_Peirsol").glob("*.jpg"))
    images = [read_image(f) for f in files]
    aligner = Aligner(DataCfg(align="mtcnn"))
    faces = aligner(images)
    assert aligner.stats.detected == len(images) and aligner.stats.fallbacks == 0
    assert all(f.shape == (112, 112, 3) for f in faces)
    # Detecting again on the aligned crops finds the landmarks where the warp put them.
    again = MTCNN(min_face=40).detect(faces)
    for boxes, marks in again:
        k = pick_face(boxes, (112, 112))
        err = np.linalg.norm(marks[k] - ARCFACE_TEMPLATE, axis=1)
        assert err.mean() < 4.0, err


@needs_weights
def test_no_face_falls_back_to_the_centre_crop_and_is_counted(lfw_root):
    flat = np.full((250, 250, 3), 127, np.uint8)
    face = read_image(lfw_root / "lfw-deepfunneled/Aaron_Eckhart/Aaron_Eckhart_0001.jpg")
    cfg = DataCfg(align="mtcnn")
    aligner = Aligner(cfg)
    out = aligner([flat, face], ["flat.png", "Aaron_Eckhart_0001.jpg"])
    assert aligner.stats.fallbacks == 1 and aligner.stats.detected == 1
    assert aligner.stats.fallback_examples == ["flat.png"]
    assert np.array_equal(out[0], center_crop(flat, cfg.crop_box, 112)[0])
    # Different image sizes are grouped and all handled.
    small = cv2.resize(face, (160, 160))
    out = aligner([small, face, flat[:100, :100]])
    assert len(out) == 3 and all(o.shape == (112, 112, 3) for o in out)


@needs_weights
def test_mtcnn_training_alignment_is_servings_on_any_photo_size(lfw_root):
    """Prepare's mtcnn mode finds faces as serving does: a photo 6x larger aligns to the same face."""
    from crfr.faces.align import align_face

    face = read_image(lfw_root / "lfw-deepfunneled/Aaron_Eckhart/Aaron_Eckhart_0001.jpg")
    big = cv2.resize(face, (1500, 1500), interpolation=cv2.INTER_CUBIC)
    aligner = Aligner(DataCfg(align="mtcnn"))
    small_out, big_out = aligner([face, big])
    assert aligner.stats.detected == 2
    assert np.abs(small_out.astype(int) - big_out.astype(int)).mean() < 6.0
    assert np.array_equal(big_out, align_face(big))  # serving's crop of the same photo


@needs_weights
def test_mtcnn_training_alignment_runs_mtcnn_once_per_image(lfw_root, tmp_path, monkeypatch):
    """data.align: mtcnn with data.align_cache: a second prepare of the same images reads every face (and its
    fallback) from the cache, identical, without running the detector."""
    from crfr import storage
    from crfr.faces import align

    monkeypatch.setenv("CRFR_CACHE_DIR", str(tmp_path / "cache"))
    files = sorted((lfw_root / "lfw-deepfunneled" / "Aaron_Peirsol").glob("*.jpg"))
    images = [read_image(f) for f in files] + [np.full((250, 250, 3), 127, np.uint8)]
    keys = [f"{i:064x}" for i in range(len(images))]
    cfg = DataCfg(align="mtcnn")
    assert storage.cache_dir() == tmp_path / "cache"
    first = Aligner.cached(cfg)
    faces = first(images, [f.name for f in files] + ["flat"], keys)
    assert first.cache_report()["misses"] == len(images) and first.stats.fallbacks == 1

    def no_detector(*args, **kwargs):
        raise AssertionError("MTCNN ran for a cached image")

    monkeypatch.setattr(align, "find_faces", no_detector)
    second = Aligner.cached(cfg)
    again = second(images, [f.name for f in files] + ["flat"], keys)
    assert second.cache_report()["hits"] == len(images)
    assert all(np.array_equal(a, b) for a, b in zip(faces, again))
    assert (second.stats.detected, second.stats.fallbacks) == (first.stats.detected, first.stats.fallbacks)
    assert Aligner.cached(DataCfg(align="center-crop")).cache is None  # nothing to save there


@needs_weights
def test_align_face_for_serving(lfw_root):
    from crfr.faces.align import align_face

    face = read_image(lfw_root / "lfw-deepfunneled/Aaron_Eckhart/Aaron_Eckhart_0001.jpg")
    out = align_face(face)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    assert align_face(np.full((200, 200, 3), 90, np.uint8)) is None
