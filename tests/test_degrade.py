"""The degradation model of Fig. 2 and the paper's linear test transform, on a real LFW face."""

import cv2
import numpy as np
import pytest

from crfr.config import DegradeCfg
from crfr.degrade import (
    Degrader,
    bicubic_probe,
    gaussian_blur,
    gaussian_noise,
    jpeg,
    linear_probe,
    motion_blur,
    poisson_noise,
    upsample,
)


def test_same_seed_and_index_give_the_same_image(lfw_face):
    d = Degrader(DegradeCfg(), seed=3)
    assert np.array_equal(d(lfw_face, 17), d(lfw_face, 17))
    assert np.array_equal(Degrader(DegradeCfg(), seed=3)(lfw_face, 17), d(lfw_face, 17))


def test_different_indices_or_seeds_differ(lfw_face):
    d = Degrader(DegradeCfg(), seed=3)
    outs = [d(lfw_face, i) for i in range(8)]
    assert len({o.tobytes() for o in outs}) == 8
    assert not np.array_equal(Degrader(DegradeCfg(), seed=4)(lfw_face, 17), d(lfw_face, 17))


def test_shapes_and_dtypes(lfw_face):
    out, applied = Degrader(DegradeCfg(out_size=112), seed=0).apply(lfw_face, 0)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    low, _ = Degrader(DegradeCfg(), seed=0).apply_lr(lfw_face, 0, size=14)
    assert low.shape == (14, 14, 3) and low.dtype == np.uint8
    assert 12 <= applied.size <= 63


def test_sizes_cover_the_range_or_set(lfw_face):
    d = Degrader(DegradeCfg(sizes=[12, 20]), seed=0)
    assert {d.apply_lr(lfw_face, i)[1].size for i in range(300)} == set(range(12, 21))
    d = Degrader(DegradeCfg(sizes=[14, 28, 56], size_mode="set"), seed=0)
    assert {d.apply_lr(lfw_face, i)[1].size for i in range(100)} == {14, 28, 56}


def test_p_zero_leaves_only_the_resizing(lfw_face):
    cfg = DegradeCfg(p_blur=0, p_noise=0, p_jpeg=0, sizes=[20, 20])
    out, applied = Degrader(cfg, seed=0).apply(lfw_face, 5)
    assert applied.ops == []
    assert np.array_equal(out, bicubic_probe(lfw_face, 20))


def test_p_one_applies_every_corruption(lfw_face):
    cfg = DegradeCfg(p_blur=1, p_noise=1, p_jpeg=1)
    ops = [Degrader(cfg, seed=0).apply(lfw_face, i)[1] for i in range(20)]
    assert all(a.blur and a.noise and a.jpeg_quality for a in ops)
    assert {a.blur.split()[0] for a in ops} == {"gaussian", "motion"}


def test_corrupt_false_is_plain_bicubic(lfw_face):
    out, applied = Degrader(DegradeCfg(p_blur=1, p_noise=1, p_jpeg=1), seed=0, corrupt=False).apply(lfw_face, 2)
    assert applied.ops == [] and np.array_equal(out, bicubic_probe(lfw_face, applied.size))


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda im, rng: gaussian_blur(im, 1.5),
        lambda im, rng: motion_blur(im, 9, 30.0),
        lambda im, rng: gaussian_noise(im, 10.0, rng),
        lambda im, rng: poisson_noise(im, rng),
        lambda im, rng: jpeg(im, 20),
    ],
    ids=["gaussian-blur", "motion-blur", "gaussian-noise", "poisson-noise", "jpeg"],
)
def test_each_corruption_changes_the_image(lfw_face, corrupt):
    out = corrupt(lfw_face, np.random.default_rng(0))
    assert out.shape == lfw_face.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - lfw_face).mean() > 0.5


def test_blur_removes_high_frequencies(lfw_face):
    lap = lambda im: cv2.Laplacian(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()
    assert lap(gaussian_blur(lfw_face, 2.0)) < 0.5 * lap(lfw_face)
    assert lap(motion_blur(lfw_face, 11, 0.0)) < 0.5 * lap(lfw_face)


def test_gaussian_noise_has_the_requested_std():
    flat = np.full((112, 112, 3), 128, np.uint8)
    noise = gaussian_noise(flat, 8.0, np.random.default_rng(0)).astype(float) - 128
    assert noise.std() == pytest.approx(8.0, rel=0.05) and abs(noise.mean()) < 0.2


def test_linear_probe_is_linear_down_and_up(lfw_face):
    expected = cv2.resize(cv2.resize(lfw_face, (14, 14), interpolation=cv2.INTER_LINEAR), (112, 112),
                          interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(linear_probe(lfw_face, 14), expected)
    assert np.array_equal(linear_probe(lfw_face, 112), lfw_face)
    low = cv2.resize(lfw_face, (14, 14), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(upsample(low, 112, "linear"), expected)


def test_rejects_non_uint8(lfw_face):
    with pytest.raises(ValueError, match="uint8"):
        Degrader(DegradeCfg()).apply(lfw_face.astype(np.float32), 0)
