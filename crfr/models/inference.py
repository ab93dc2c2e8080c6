"""An inference copy of a face network: batch norms folded into the layers before them, in the fastest layout.

In eval mode a batch norm after a convolution (or a linear layer) is a fixed per-channel affine map, so it
folds into that layer's weights and bias (torch's ``fuse_conv_bn_eval``): one pass over the activations fewer
for each. iresnet's pre-activation batch norm (``Block.bn1``, before a zero-padded convolution) does not fold
exactly and stays. The head's ``bn2 -> flatten -> fc -> features`` folds into one linear layer.

The embeddings differ from the unfolded network's by float32 rounding only (tests/test_inference.py).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from crfr.models.iresnet import Block, IResNet


def _fold_head(net: IResNet) -> None:
    """``features(fc(flatten(bn2(x))))`` as one linear layer (bn2 is per channel, repeated over the 7x7 map)."""
    fc = fuse_linear_bn_eval(net.fc, net.features)
    bn = net.bn2
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    per_input = fc.in_features // scale.numel()
    scale, shift = scale.repeat_interleave(per_input), shift.repeat_interleave(per_input)
    with torch.no_grad():
        fc.bias.add_(fc.weight @ shift)
        fc.weight.mul_(scale)
    net.fc, net.bn2, net.features = fc, nn.Identity(), nn.Identity()


def fold_batchnorm(net: IResNet) -> IResNet:
    """An eval copy of ``net`` with every foldable batch norm folded (``net`` itself is left as it is)."""
    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        net.conv1, net.bn1 = fuse_conv_bn_eval(net.conv1, net.bn1), nn.Identity()
        for block in net.modules():
            if not isinstance(block, Block):
                continue
            block.conv1, block.bn2 = fuse_conv_bn_eval(block.conv1, block.bn2), nn.Identity()
            block.conv2, block.bn3 = fuse_conv_bn_eval(block.conv2, block.bn3), nn.Identity()
            if block.downsample is not None:
                conv, bn = block.downsample
                block.downsample = nn.Sequential(fuse_conv_bn_eval(conv, bn))
        _fold_head(net)  # dropout sits between bn2 and fc, but in eval mode it is the identity
    for param in net.parameters():
        param.requires_grad_(False)
    return net


def inference_model(net: nn.Module, channels_last: bool = True) -> nn.Module:
    """The network as evaluation, embedding and serving run it: batch norms folded, NHWC when asked.

    Args:
        net: a crfr face network (an :class:`IResNet`; anything else is only put in eval mode and layout).
        channels_last: NHWC weights (``runtime.channels_last``); :func:`crfr.models.embedding.embed_images`
            feeds batches in the model's layout.
    """
    net = fold_batchnorm(net) if isinstance(net, IResNet) else net.eval()
    return net.to(memory_format=torch.channels_last) if channels_last else net
