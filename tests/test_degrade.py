"""The degradation model of Fig. 2 and the paper's linear test transform, on a real LFW face."""

import cv2
import numpy as np
import pytest

from crfr.config import DegradeCfg
from crfr.degrade import (
    Degrader,
    bicubic_probe,
    downscale,
    gaussian_blur,
    gaussian_noise,
    jpeg,
    linear_down,
    linear_probe,
    motion_blur,
    poisson_noise,
    unit_noise,
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


def test_gaussian_noise_is_independent_between_samples():
    """No two samples share a noise pattern, at any shift (a shared pool of fields would correlate ~0.5-1)."""
    flat = np.full((112, 112, 3), 128, np.uint8)
    fields = [gaussian_noise(flat, 10.0, np.random.default_rng((0, i)))[..., 0].astype(float) - 128
              for i in range(24)]
    spectra = [np.fft.rfft2(f, s=(224, 224)) for f in fields]
    norms = [np.sqrt((f**2).sum()) for f in fields]
    worst = 0.0
    for i in range(len(fields)):
        for j in range(i + 1, len(fields)):
            corr = np.fft.irfft2(spectra[i] * np.conj(spectra[j]), s=(224, 224))
            worst = max(worst, np.abs(corr).max() / (norms[i] * norms[j]))
    assert worst < 0.1, f"two samples' noise fields correlate at {worst:.2f} at some shift"


def test_unit_noise_is_standard_normal():
    z = np.concatenate([unit_noise((112, 112, 3), np.random.default_rng((1, i))).ravel() for i in range(20)])
    assert z.dtype == np.float32 and abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, abs=0.01)
    assert (np.abs(z) > 2).mean() == pytest.approx(0.0455, abs=0.002)  # the normal's two-sided 2-sigma tail
    assert (np.abs(z) > 3).mean() == pytest.approx(0.0027, abs=0.0006)
    again = unit_noise((112, 112, 3), np.random.default_rng((1, 0)))
    assert np.array_equal(again.ravel(), z[: again.size])


def _pillow_jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)  # Pillow takes RGB, as crfr's images are
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _swapped_jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """The bug: RGB handed to OpenCV, which encodes it as if it were BGR."""
    return cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("quality", [10, 50, 90])
def test_jpeg_encodes_rgb_as_an_rgb_encoder_does(lfw_face, quality):
    reference = _pillow_jpeg(lfw_face, quality)
    assert np.array_equal(jpeg(lfw_face, quality), reference)
    assert np.abs(_swapped_jpeg(lfw_face, quality).astype(int) - reference).mean() > 0.5


@pytest.mark.parametrize("quality", [50, 90])
def test_jpeg_keeps_red_detail_better_than_blue(quality):
    """Luma (full resolution, finest quantisation) weighs red 0.299 and blue 0.114: red texture survives more."""
    yy, xx = np.mgrid[0:64, 0:64]
    check = np.where((yy + xx) % 2 == 0, 40, -40)

    def surviving(channel: int, codec) -> float:
        img = np.full((64, 64, 3), 128, np.int32)
        img[..., channel] += check
        out = codec(img.astype(np.uint8), quality)[..., channel].astype(float)
        return float(np.mean((out - out.mean()) * np.sign(check)))

    assert surviving(0, jpeg) > 1.5 * max(surviving(2, jpeg), 1.0)
    assert surviving(0, _swapped_jpeg) < surviving(2, _swapped_jpeg)  # the bug inverts it


def _grating(period: float = 3.0) -> np.ndarray:
    """Vertical stripes far above the Nyquist limit of a 14 px image: nothing of them belongs in it."""
    xx = np.arange(112)
    row = 128 + 100 * np.sin(2 * np.pi * xx / period)
    return np.repeat(np.repeat(row[None, :, None], 112, 0), 3, 2).round().astype(np.uint8)


def test_antialias_keeps_fine_detail_from_aliasing_into_the_lr_image():
    img = _grating()
    for interpolation in (cv2.INTER_LINEAR, cv2.INTER_CUBIC):
        plain = downscale(img, 14, interpolation).astype(float)
        smooth = downscale(img, 14, interpolation, antialias=True).astype(float)
        assert plain.std() > 20, "the plain resize should alias the stripes into visible bands"
        assert smooth.std() < 0.2 * plain.std()
        assert abs(smooth.mean() - 128) < 2
    assert np.array_equal(downscale(img, 14, cv2.INTER_LINEAR), cv2.resize(img, (14, 14), interpolation=cv2.INTER_LINEAR))
    assert np.array_equal(downscale(img, 112, cv2.INTER_LINEAR, antialias=True), img)  # nothing to remove


def test_antialias_reaches_probes_and_training_and_is_off_by_default(lfw_face):
    assert DegradeCfg().antialias is False
    assert np.array_equal(linear_down(lfw_face, 14), cv2.resize(lfw_face, (14, 14), interpolation=cv2.INTER_LINEAR))
    assert not np.array_equal(linear_down(lfw_face, 14, antialias=True), linear_down(lfw_face, 14))
    assert np.array_equal(linear_probe(lfw_face, 14, antialias=True),
                          upsample(linear_down(lfw_face, 14, antialias=True), 112, "linear"))
    cfg = DegradeCfg(p_blur=0, p_noise=0, p_jpeg=0, sizes=[20, 20], antialias=True)
    out = Degrader(cfg, seed=0).apply(lfw_face, 5)[0]
    assert np.array_equal(out, bicubic_probe(lfw_face, 20, antialias=True))
    assert not np.array_equal(out, bicubic_probe(lfw_face, 20))
    grating = _grating()
    low = Degrader(cfg.model_copy(update={"sizes": [14, 14]}), seed=0, corrupt=False).apply_lr(grating, 0)[0]
    assert low.astype(float).std() < 0.2 * downscale(grating, 14, cv2.INTER_CUBIC).astype(float).std()
