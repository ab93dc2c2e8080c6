"""HR augmentation beyond the flip (params ``augment``) on real LFW faces: off by default and then changing
nothing, a pure function of (seed, epoch, index) when on, and the student's LR view made from the augmented face."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from components.train_teacher import teacher_spec
from crfr.config import AugmentCfg, DegradeCfg, load_params
from crfr.degrade import Degrader
from crfr.errors import ConfigError
from crfr.train.data import EPOCH_STRIDE, FaceTrainingSet
from crfr.train.run import spec_hash
from tests.builders import centre_face
from tests.conftest import lfw_image_path

KEYS = [(epoch, index) for epoch in range(3) for index in range(6)]
ON = AugmentCfg(shift=8, scale=(0.9, 1.1), rotate=10, p_gray=0.5)


@pytest.fixture(scope="module")
def faces(lfw_root):
    people = [("George_W_Bush", 1), ("George_W_Bush", 2), ("Colin_Powell", 1), ("Colin_Powell", 2),
              ("Tony_Blair", 1), ("Tony_Blair", 2)]
    return [(centre_face(lfw_image_path(name, number)), label // 2) for label, (name, number) in enumerate(people)]


def views(dataset, key) -> list[np.ndarray]:
    return [v.numpy() for v in dataset[key] if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("lr_data", [None, "bicubic", "degraded"])
def test_off_by_default_changes_nothing(faces, lr_data):
    assert not load_params("params.yaml").augment.enabled  # the demo trains without it
    plain = FaceTrainingSet(faces, lr_data, DegradeCfg(), seed=3)
    for augment in (AugmentCfg(), load_params("params.yaml").augment):
        neutral = FaceTrainingSet(faces, lr_data, DegradeCfg(), seed=3, augment=augment)
        for key in KEYS:
            for a, b in zip(views(plain, key), views(neutral, key), strict=True):
                assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b)
    # ... and that output is the flip-only face, untouched otherwise.
    hr = views(plain, (0, 2))[0]
    assert np.array_equal(hr, faces[2][0]) or np.array_equal(hr, faces[2][0][:, ::-1])


def test_enabled_is_any_knob_off_neutral():
    assert not AugmentCfg().enabled
    for knob in ({"shift": 1}, {"scale": (1.0, 1.2)}, {"rotate": 5}, {"p_gray": 0.1}):
        assert AugmentCfg(**knob).enabled, knob


def test_augmentation_is_a_pure_function_of_seed_epoch_and_index(faces):
    plain = FaceTrainingSet(faces, None, DegradeCfg(), seed=0)
    dataset = FaceTrainingSet(faces, None, DegradeCfg(), seed=0, augment=ON)
    fresh = FaceTrainingSet(faces, None, DegradeCfg(), seed=0, augment=ON)  # what a loader worker or a rank holds
    for key in KEYS:
        img = views(dataset, key)[0]
        assert img.shape == faces[0][0].shape and img.dtype == np.uint8
        assert np.array_equal(img, views(dataset, key)[0]) and np.array_equal(img, views(fresh, key)[0])
        assert not np.array_equal(img, views(plain, key)[0])
    for index in range(len(faces)):
        assert not np.array_equal(views(dataset, (0, index))[0], views(dataset, (1, index))[0])
    other_seed = FaceTrainingSet(faces, None, DegradeCfg(), seed=1, augment=ON)
    assert not np.array_equal(views(dataset, (0, 0))[0], views(other_seed, (0, 0))[0])
    # A loader worker process draws what the main process draws.
    loader = DataLoader(dataset, batch_size=3, sampler=[(2, i) for i in range(6)], num_workers=1)
    loaded = torch.cat([hr for hr, _ in loader]).numpy()
    assert np.array_equal(loaded, np.stack([views(dataset, (2, i))[0] for i in range(6)]))


def test_grayscale_is_the_flipped_faces_luma_in_three_channels(faces):
    import cv2

    plain = FaceTrainingSet(faces, None, DegradeCfg(), seed=0)
    gray = FaceTrainingSet(faces, None, DegradeCfg(), seed=0, augment=AugmentCfg(p_gray=1.0))
    for key in KEYS[:6]:
        img, flipped = views(gray, key)[0], views(plain, key)[0]
        expected = cv2.cvtColor(flipped, cv2.COLOR_RGB2GRAY)
        assert all(np.array_equal(img[:, :, c], expected) for c in range(3))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def test_students_lr_view_is_degraded_from_the_augmented_face(faces):
    degrade = DegradeCfg()
    plain = FaceTrainingSet(faces, "degraded", degrade, seed=0)
    shifted = FaceTrainingSet(faces, "degraded", degrade, seed=0, augment=AugmentCfg(shift=24))
    degrader = Degrader(degrade, seed=0, corrupt=True)
    closer = 0
    for epoch, index in KEYS:
        hr, low = views(shifted, (epoch, index))
        original = views(plain, (epoch, index))[0]
        # The same degradation draws as without augmentation, applied to the augmented face.
        assert np.array_equal(low, degrader(hr, epoch * EPOCH_STRIDE + index))
        closer += _corr(low, hr) > _corr(low, original)
    assert closer == len(KEYS)


def test_lr_augment_moves_the_students_lr_view_alone(faces):
    """student.lr_augment: a loose crop's misplacement in the LR view; the teacher's HR view stays aligned."""
    degrade = DegradeCfg()
    plain = FaceTrainingSet(faces, "degraded", degrade, seed=0)
    loose = FaceTrainingSet(faces, "degraded", degrade, seed=0, lr_augment=AugmentCfg(shift=12, rotate=8))
    again = FaceTrainingSet(faces, "degraded", degrade, seed=0, lr_augment=AugmentCfg(shift=12, rotate=8))
    moved = 0
    for key in KEYS:
        (hr, low), (hr0, low0) = views(loose, key), views(plain, key)
        assert np.array_equal(hr, hr0)
        assert all(np.array_equal(a, b) for a, b in zip(views(again, key), (hr, low)))
        moved += not np.array_equal(low, low0)
    assert moved == len(KEYS)
    params = load_params("params.yaml", ["student.lr_augment.shift=10"])
    from components.distill_student import student_spec

    assert student_spec(params, "teacher").lr_augment.shift == 10
    assert student_spec(load_params("params.yaml"), "teacher").lr_augment is None


def test_checkpoint_fingerprint_covers_augmentation_only_when_on():
    params = load_params("params.yaml")
    spec = teacher_spec(params)
    base = spec_hash(spec, params)
    assert spec_hash(spec, load_params("params.yaml", ["augment.rotate=0.0"])) == base
    assert spec_hash(spec, load_params("params.yaml", ["augment.rotate=5"])) != base


@pytest.mark.parametrize("override, message", [
    ("augment.shift=-2", "'augment.shift': Input should be greater than or equal to 0"),
    ("augment.scale=[1.2, 0.9]", "'augment': scale must be [low, high] with low <= high"),
    ("augment.scale=[0, 1.1]", "'augment': scale must be > 0"),
    ("augment.rotate=-1", "'augment.rotate': Input should be greater than or equal to 0"),
    ("augment.p_gray=1.5", "'augment.p_gray': Input should be less than or equal to 1"),
    ("augment.p_gray=-0.1", "'augment.p_gray': Input should be greater than or equal to 0"),
    ("augment.flip=0.5", "unknown key 'augment.flip'"),
])
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_params("params.yaml", [override])
    assert message in str(err.value)
