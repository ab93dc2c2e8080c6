"""iresnet and WaveResNet: shapes, identical parameters, WaveConv really used."""

import pytest
import torch

from crfr.config import ModelCfg
from crfr.models import IResNet, build_backbone, count_parameters
from crfr.models.waveconv import WaveDown


@pytest.mark.parametrize("depth", [18, 34, 50, 100])
def test_wave_and_plain_have_identical_parameters(depth):
    plain = IResNet(depth, width=0.125, embedding_size=32)
    wave = IResNet(depth, width=0.125, embedding_size=32, wave=True)
    assert count_parameters(plain) == count_parameters(wave)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in wave.state_dict().items()}


@pytest.mark.parametrize("backbone", ["iresnet", "waveresnet"])
def test_forward_shapes_and_stage_features(backbone):
    model = build_backbone(backbone, ModelCfg(depth=18, width=0.25, embedding_size=64)).eval()
    emb, stages = model.forward_stages(torch.randn(2, 3, 112, 112))
    assert emb.shape == (2, 64)
    assert [s.shape[1:] for s in stages] == [
        (16, 56, 56),
        (32, 28, 28),
        (64, 14, 14),
        (128, 7, 7),
    ]


def test_waveresnet_has_no_stride2_convolutions():
    wave = IResNet(18, width=0.125, embedding_size=16, wave=True)
    plain = IResNet(18, width=0.125, embedding_size=16)
    strided = lambda m: [n for n, c in m.named_modules() if isinstance(c, torch.nn.Conv2d) and c.stride == (2, 2)]
    assert len(strided(plain)) == 8  # conv2 + shortcut of each stage's first block
    assert strided(wave) == []
    assert sum(isinstance(m, WaveDown) for m in wave.modules()) == 1  # one stateless filter, shared


def test_student_loads_teacher_weights_and_differs_in_output():
    teacher = IResNet(18, width=0.125, embedding_size=16).eval()
    student = IResNet(18, width=0.125, embedding_size=16, wave=True).eval()
    student.load_state_dict(teacher.state_dict())
    x = torch.randn(2, 3, 112, 112)
    # Same weights, different downsampling: the outputs must differ (WaveConv is really in the path).
    assert not torch.allclose(teacher(x), student(x))


def test_width_multiplier_scales_channels():
    assert IResNet(18, width=0.25).stage_channels == (16, 32, 64, 128)
    assert IResNet(18, width=1.0).stage_channels == (64, 128, 256, 512)


@pytest.mark.parametrize("wavelet", ["db2", "bior2.2"])
def test_longer_wavelets_keep_the_network_shape(wavelet):
    model = build_backbone("waveresnet", ModelCfg(width=0.125, embedding_size=16, wavelet=wavelet)).eval()
    assert model(torch.randn(1, 3, 112, 112)).shape == (1, 16)


def test_bad_depth_is_rejected():
    with pytest.raises(ValueError, match="depth"):
        IResNet(depth=20)


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_of_each_blocks_last_batch_norm_is_an_option(zero_init):
    model = build_backbone("iresnet", ModelCfg(width=0.125, embedding_size=16, zero_init_residual=zero_init))
    scales = [float(m.bn3.weight.detach().abs().sum()) for m in model.modules() if hasattr(m, "bn3")]
    assert len(scales) == 8 and all((s == 0) == zero_init for s in scales)
