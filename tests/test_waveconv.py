"""The LL filters against PyWavelets, and their gradients."""

import numpy as np
import pytest
import pywt
import torch

from crfr.models.waveconv import LowPass2d, WaveDown

SIZES = [(8, 8), (56, 56), (7, 9), (13, 6)]


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("wavelet", ["haar", "db2"])
@pytest.mark.parametrize("mode", ["zero", "symmetric", "reflect", "periodization"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ll_matches_pywt(impl, wavelet, mode, size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, *size))
    expected = pywt.dwt2(x, wavelet, mode=mode, axes=(-2, -1))[0]
    got = LowPass2d(wavelet, mode, impl)(torch.tensor(x, dtype=torch.float32)).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("wavelet", ["bior2.2", "db3", "sym4"])
def test_fast_ll_matches_pywt_for_longer_wavelets(wavelet):
    x = np.random.default_rng(1).standard_normal((1, 2, 17, 20))
    for mode in ("zero", "symmetric", "reflect", "periodization"):
        expected = pywt.dwt2(x, wavelet, mode=mode, axes=(-2, -1))[0]
        got = LowPass2d(wavelet, mode, "fast")(torch.tensor(x, dtype=torch.float32)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=mode)


def test_haar_even_is_twice_avg_pool():
    x = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(LowPass2d("haar")(x), 2 * torch.nn.functional.avg_pool2d(x, 2))


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("wavelet,size", [("haar", 8), ("haar", 7), ("db2", 10)])
def test_gradients_match_autograd_of_reference(impl, wavelet, size):
    """The LL band is linear in x: its gradient is the adjoint filter, identical for both implementations."""
    x = torch.randn(1, 2, size, size, dtype=torch.float32, requires_grad=True)
    y = LowPass2d(wavelet, "zero", impl)(x)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    grad = x.grad.clone()
    assert grad.abs().sum() > 0
    x2 = x.detach().clone().requires_grad_(True)
    ref = LowPass2d(wavelet, "zero", "reference")(x2)
    (ref * weights).sum().backward()
    torch.testing.assert_close(grad, x2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_haar_fast_paths_agree_with_pooling_in_value_and_gradient(layout):
    """NCHW takes HaarLL (block sums), NHWC the depthwise convolution: both are 2 x the 2x2 mean, and so are
    their gradients (half of each output gradient on every pixel of its block)."""
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(3, 5, 12, 10, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_(True)
    y = LowPass2d("haar")(x)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    pooled = 2 * torch.nn.functional.avg_pool2d(x2, 2)
    (pooled * weights).sum().backward()
    torch.testing.assert_close(y, pooled)
    torch.testing.assert_close(x.grad, x2.grad)
    assert torch.autograd.gradcheck(LowPass2d("haar"), (x.detach().contiguous().requires_grad_(True),))


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_wavedown_matches_strided_conv_size(wavelet):
    for n in (56, 28, 7):
        out = WaveDown(wavelet)(torch.randn(1, 3, n, n))
        assert out.shape[-1] == (n + 1) // 2


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        LowPass2d("haar", "wrap")


def test_reference_filters_stay_out_of_the_state_dict():
    from crfr.config import ModelCfg
    from crfr.models import build_backbone

    assert LowPass2d("db2", "zero", "reference").state_dict() == {}
    cfg = ModelCfg(depth=18, width=0.125, embedding_size=32, ll_impl="reference")
    teacher = build_backbone("iresnet", cfg).eval()
    student = build_backbone("waveresnet", cfg).eval()
    student.load_state_dict(teacher.state_dict(), strict=True)  # a student starts from its teacher
    fast = build_backbone("waveresnet", cfg.model_copy(update={"ll_impl": "fast"})).eval()
    fast.load_state_dict(student.state_dict(), strict=True)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(student(x), fast(x), atol=1e-4, rtol=1e-4)
    # Still buffers: they follow .to() / .double() with the module.
    assert {b.dtype for n, b in student.double().named_buffers() if "_reference" in n} == {torch.float64}


def test_state_dicts_saved_with_reference_filters_still_load():
    f = LowPass2d("haar", "zero", "reference")
    legacy = {f"_reference.{name}": buf.clone() for name, buf in f._reference.named_buffers()}
    assert set(legacy) == {"_reference.h0_col", "_reference.h1_col", "_reference.h0_row", "_reference.h1_row"}
    f.load_state_dict(legacy, strict=True)


def test_reference_fails_under_autocast_so_params_refuse_it_with_amp():
    """pytorch_wavelets' float32 filters meet bf16 activations: the reason for the refusal below."""
    from crfr.config import load_params
    from crfr.errors import ConfigError

    f = LowPass2d("haar", "zero", "reference")
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = f(torch.nn.functional.conv2d(x, torch.randn(2, 2, 1, 1))).float().sum()
    with pytest.raises(RuntimeError, match="type"):
        loss.backward()  # as training does: backward outside the autocast region
    with pytest.raises(ConfigError, match=r"model\.ll_impl: reference needs runtime\.amp: none \(got bf16\)"):
        load_params("params.yaml", ["model.ll_impl=reference"])
    with pytest.raises(ConfigError, match="got fp16"):
        load_params("params.yaml", ["model.ll_impl=reference", "runtime.amp=fp16"])
    assert load_params("params.yaml", ["model.ll_impl=reference", "runtime.amp=none"]).model.ll_impl == "reference"
