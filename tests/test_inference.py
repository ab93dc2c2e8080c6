"""The inference copy of a network (batch norms folded, NHWC): the same embeddings, the original untouched."""

import copy

import pytest
import torch

from crfr.config import ModelCfg
from crfr.models import BACKBONES, build_backbone
from crfr.models.inference import fold_batchnorm, inference_model


def trained_looking(backbone: str) -> torch.nn.Module:
    """A network whose batch norms are not the identity, as after training."""
    torch.manual_seed(0)
    net = build_backbone(backbone, ModelCfg(depth=18, width=0.125, embedding_size=32)).eval()
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_network_gives_the_same_embeddings(backbone, channels_last):
    net = trained_looking(backbone)
    before = copy.deepcopy(net.state_dict())
    runner = inference_model(net, channels_last)
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    layout = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode():
        expected, got = net(x), runner(x.contiguous(memory_format=layout))
    cosine = torch.nn.functional.cosine_similarity(expected, got)
    assert cosine.min() > 1 - 1e-6
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the original is left alone


def test_every_foldable_batch_norm_is_folded():
    folded = fold_batchnorm(trained_looking("waveresnet"))
    left = [name for name, m in folded.named_modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    # Only the pre-activation norms, which sit before a zero-padded convolution, stay.
    assert left and all(name.endswith(".bn1") for name in left)
    assert not any(p.requires_grad for p in folded.parameters())
