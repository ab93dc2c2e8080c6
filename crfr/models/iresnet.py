"""insightface-style iresnet, and WaveResNet: the same network with WaveConv downsampling.

iresnet: 3x3 stride-1 stem (no max-pool), four stages of pre-activation basic blocks whose first block
downsamples with a stride-2 3x3 convolution and a stride-2 1x1 shortcut, and the head
BN -> dropout -> FC -> BN1d. A 112x112 face gives 7x7 maps before the head.

WaveResNet (``wave=True``) replaces each stride-2 convolution, in the residual branch and in the shortcut,
by WaveConv: the DWT low-pass LL band (stride 2) followed by the same convolution at stride 1. The LL filter
has no parameters, so both networks have identical parameter names and shapes: a student can start from its
teacher's weights with ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

from crfr.models.waveconv import WaveDown

LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
BASE_WIDTHS = (64, 128, 256, 512)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class Block(nn.Module):
    """insightface's IBasicBlock; with ``wave`` its stride-2 convolutions become WaveConv."""

    def __init__(self, cin: int, cout: int, stride: int, wave: WaveDown | None) -> None:
        super().__init__()
        conv_stride = 1 if wave is not None else stride
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = conv3x3(cout, cout, conv_stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.wave = wave if stride == 2 else None
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=conv_stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.prelu(self.bn2(self.conv1(self.bn1(x))))
        if self.wave is not None:
            out = self.wave(out)
        out = self.bn3(self.conv2(out))
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(self.wave(x) if self.wave is not None else x)
        return out + shortcut


class IResNet(nn.Module):
    """Face embedding network.

    Args:
        depth: 18, 34, 50 or 100.
        width: channel multiplier of (64, 128, 256, 512); 0.25 trains at CPU speed.
        embedding_size: length of the returned embedding.
        dropout: dropout before the FC layer.
        input_size: square input side; the FC layer is sized for it (112 gives 7x7).
        wave: build WaveResNet (WaveConv instead of stride-2 convolutions).
        wavelet, wave_mode, ll_impl: WaveConv's filter (see ``LowPass2d``).
        zero_init_residual: start each block's last batch norm at 0, so that every block starts as its
            shortcut (insightface's default: off).
    """

    def __init__(
        self,
        depth: int = 50,
        width: float = 1.0,
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: int = 112,
        wave: bool = False,
        wavelet: str = "haar",
        wave_mode: str = "zero",
        ll_impl: str = "fast",
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"depth must be one of {sorted(LAYERS)}, got {depth}")
        widths = [max(4, round(w * width)) for w in BASE_WIDTHS]
        self.depth, self.width, self.wave = depth, width, wave
        self.embedding_size = embedding_size
        self.stage_channels = tuple(widths)
        down = WaveDown(wavelet, wave_mode, ll_impl) if wave else None
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        stages, cin = [], widths[0]
        for blocks, cout in zip(LAYERS[depth], widths):
            layer = [Block(cin, cout, 2, down)] + [Block(cout, cout, 1, None) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layer))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        side = input_size
        for _ in range(4):
            side = (side + 1) // 2
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        # insightface fixes the last BN's scale at 1: the embedding's scale is left to the loss.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if not zero_init_residual:
            return
        # Every block starts as its shortcut: a deep net trains from scratch without warmup at lr 0.1.
        for m in self.modules():
            if isinstance(m, Block):
                nn.init.constant_(m.bn3.weight, 0)

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embedding and the four stage outputs (stages 1 and 2 feed the wavelet-similarity loss)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        x = self.fc(self.dropout(x))
        return self.features(x), stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised embedding (L2-normalise it for matching)."""
        return self.forward_stages(x)[0]
