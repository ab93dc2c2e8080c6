"""MTCNN face detector with 5 landmarks (Zhang et al. 2016), on the weights shipped in facenet-pytorch 2.6.0.

The facenet-pytorch package is never imported (it pins old torch/numpy and needs torchvision): its three
``.pt`` state dicts are located with ``importlib.metadata`` (or in ``$CRFR_MTCNN_WEIGHTS``) and loaded with
``torch.load(weights_only=True)`` into the small networks below, whose attribute names follow the keys of
those files. The weights come from the TensorFlow port of the original Caffe models, which flattens
feature maps in (width, height, channel) order; the dense layers therefore see permuted maps.

Cascade: P-Net on an image pyramid proposes 12x12-window boxes, R-Net (24x24 crops) and O-Net (48x48 crops)
re-score and refine them; O-Net also gives the 5 landmarks (eyes, nose tip, mouth corners). Boxes are kept in
the original implementation's 1-based inclusive pixel convention; landmarks are returned 0-based.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from crfr.errors import DataError

WEIGHTS_ENV = "CRFR_MTCNN_WEIGHTS"
MTCNN_FILES = ("pnet.pt", "rnet.pt", "onet.pt")


def _flatten_wh(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal net: fully convolutional, one 12x12 window per output cell (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)  # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, 1)  # box offsets

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten_wh(self.prelu3(self.conv3(x)))))
        return torch.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net on 48x48 crops: score, box offsets and 5 landmarks (x1..x5, y1..y5, relative to the box)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_flatten_wh(self.prelu4(self.conv4(x)))))
        return torch.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def weights_dir() -> Path:
    """The folder holding pnet.pt, rnet.pt and onet.pt: ``$CRFR_MTCNN_WEIGHTS`` or the facenet-pytorch wheel's."""
    if os.environ.get(WEIGHTS_ENV):
        folder = Path(os.environ[WEIGHTS_ENV])
    else:
        try:
            dist = importlib.metadata.distribution("facenet-pytorch")
        except importlib.metadata.PackageNotFoundError:
            raise DataError(
                "align: mtcnn needs the MTCNN weights of facenet-pytorch 2.6.0: "
                "pip install --no-deps facenet-pytorch==2.6.0 (or set CRFR_MTCNN_WEIGHTS to a folder with "
                "pnet.pt, rnet.pt, onet.pt)"
            ) from None
        found = [f for f in dist.files or [] if f.name == "pnet.pt"]
        if not found:
            raise DataError("align: the installed facenet-pytorch has no pnet.pt; reinstall facenet-pytorch==2.6.0")
        folder = Path(dist.locate_file(found[0])).parent
    missing = [f for f in MTCNN_FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(f"align: MTCNN weights {missing} not found in {folder}")
    return folder


def _load(net: nn.Module, path: Path) -> nn.Module:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataError(f"align: cannot load MTCNN weights {path}: {exc}") from None
    return net.eval()


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; ``mode`` "min" divides the overlap by the smaller box (O-Net stage)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square around its centre (the next stage takes square crops)."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply R/O-Net box offsets (fractions of the box size, inclusive pixel widths)."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out = boxes.copy()
    out[:, 0:4] = boxes[:, 0:4] + reg * np.stack([w, h, w, h], axis=1)
    return out


def _to_input(patches: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB -> the nets' input: (x - 127.5) / 128, NCHW."""
    t = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float()
    return (t - 127.5) * 0.0078125


def _crops(img: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Square crops of ``boxes`` (1-based inclusive, rounded down), zero-padded outside the image, resized."""
    h, w = img.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(np.fix(boxes[:, :4]).astype(np.int64)):
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        if bw < 1 or bh < 1:
            continue
        tmp = np.zeros((bh, bw, 3), np.uint8)
        sx, sy, ex, ey = max(x1 - 1, 0), max(y1 - 1, 0), min(x2, w), min(y2, h)
        if ex > sx and ey > sy:
            tmp[sy - (y1 - 1) : ey - (y1 - 1), sx - (x1 - 1) : ex - (x1 - 1)] = img[sy:ey, sx:ex]
        out[k] = cv2.resize(tmp, (size, size), interpolation=cv2.INTER_AREA)
    return out


class MTCNN:
    """Batched MTCNN detector.

    Args:
        min_face: smallest face side searched, in pixels (sets the first pyramid scale).
        thresholds: score thresholds of P-, R- and O-Net.
        factor: pyramid scale step.
        weights: folder with the three weight files; None finds them (see :func:`weights_dir`).
    """

    def __init__(
        self,
        min_face: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        weights: str | Path | None = None,
    ) -> None:
        folder = Path(weights) if weights is not None else weights_dir()
        self.pnet = _load(PNet(), folder / "pnet.pt")
        self.rnet = _load(RNet(), folder / "rnet.pt")
        self.onet = _load(ONet(), folder / "onet.pt")
        self.min_face, self.thresholds, self.factor = min_face, thresholds, factor

    def scales(self, h: int, w: int) -> list[float]:
        m = 12.0 / self.min_face
        side = min(h, w) * m
        out = []
        while side >= 12:
            out.append(m * self.factor ** len(out))
            side *= self.factor
        return out

    @torch.inference_mode()
    def detect(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Faces in each uint8 RGB image: ``(boxes (K, 5) x1 y1 x2 y2 score, landmarks (K, 5, 2) x y)``.

        Images of the same size go through P-Net together; all candidate crops of all images go through R-Net
        and O-Net together.
        """
        results: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros((0, 5)), np.zeros((0, 5, 2)))] * len(images)
        proposals = [self._propose_group(images, idx) for idx in _group_by_shape(images)]
        boxes_per_image: dict[int, np.ndarray] = {}
        for group in proposals:
            boxes_per_image.update(group)
        # R-Net: all images' candidates at once.
        boxes_per_image = self._refine(images, boxes_per_image, self.rnet, 24, self.thresholds[1])
        final = self._output(images, boxes_per_image)
        for i, res in final.items():
            results[i] = res
        return results

    def _propose_group(self, images: list[np.ndarray], idx: list[int]) -> dict[int, np.ndarray]:
        h, w = images[idx[0]].shape[:2]
        per_image: dict[int, list[np.ndarray]] = {i: [] for i in idx}
        for scale in self.scales(h, w):
            hs, ws = int(np.ceil(h * scale)), int(np.ceil(w * scale))
            batch = np.stack([cv2.resize(images[i], (ws, hs), interpolation=cv2.INTER_AREA) for i in idx])
            prob, reg = self.pnet(_to_input(batch))
            prob, reg = prob.numpy(), reg.numpy()
            for b, i in enumerate(idx):
                ys, xs = np.nonzero(prob[b] >= self.thresholds[0])
                if not len(ys):
                    continue
                score = prob[b, ys, xs]
                offsets = reg[b][:, ys, xs].T
                cells = np.stack([xs, ys], axis=1).astype(np.float64)
                q1 = np.fix((2 * cells + 1) / scale)
                q2 = np.fix((2 * cells + 12) / scale)
                boxes = np.concatenate([q1, q2, score[:, None], offsets], axis=1)
                boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)]
                per_image[i].append(boxes)
        out: dict[int, np.ndarray] = {}
        for i, parts in per_image.items():
            if not parts:
                continue
            boxes = np.concatenate(parts)
            boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
            # P-Net offsets are fractions of the (exclusive) window size.
            bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            refined = boxes[:, :4] + boxes[:, 5:9] * np.stack([bw, bh, bw, bh], axis=1)
            out[i] = np.fix(_square(np.concatenate([refined, boxes[:, 4:5]], axis=1)))
            out[i][:, 4] = boxes[:, 4]
        return out

    def _refine(self, images, boxes_per_image, net, size, threshold) -> dict[int, np.ndarray]:
        order = [i for i in boxes_per_image if len(boxes_per_image[i])]
        if not order:
            return {}
        crops = np.concatenate([_crops(images[i], boxes_per_image[i], size) for i in order])
        prob, reg = (t.numpy() for t in net(_to_input(crops)))
        out: dict[int, np.ndarray] = {}
        start = 0
        for i in order:
            boxes = boxes_per_image[i]
            n = len(boxes)
            p, r = prob[start : start + n], reg[start : start + n]
            start += n
            keep = p > threshold
            if not keep.any():
                continue
            cand = np.concatenate([boxes[keep, :4], p[keep, None]], axis=1)
            r = r[keep]
            pick = nms(cand[:, :4], cand[:, 4], 0.7)
            cand, r = cand[pick], r[pick]
            out[i] = np.fix(_square(_regress(cand, r)))
            out[i][:, 4] = cand[:, 4]
        return out

    def _output(self, images, boxes_per_image) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        order = [i for i in boxes_per_image if len(boxes_per_image[i])]
        if not order:
            return {}
        crops = np.concatenate([_crops(images[i], boxes_per_image[i], 48) for i in order])
        prob, reg, marks = (t.numpy() for t in self.onet(_to_input(crops)))
        out = {}
        start = 0
        for i in order:
            boxes = boxes_per_image[i]
            n = len(boxes)
            p, r, m = prob[start : start + n], reg[start : start + n], marks[start : start + n]
            start += n
            keep = p > self.thresholds[2]
            if not keep.any():
                continue
            cand, r, m = boxes[keep, :4], r[keep], m[keep]
            w = (cand[:, 2] - cand[:, 0] + 1)[:, None]
            h = (cand[:, 3] - cand[:, 1] + 1)[:, None]
            points = np.stack([w * m[:, :5] + cand[:, 0:1] - 1, h * m[:, 5:] + cand[:, 1:2] - 1], axis=2)
            final = np.concatenate([_regress(cand, r)[:, :4], p[keep, None]], axis=1)
            pick = nms(final[:, :4], final[:, 4], 0.7, mode="min")
            out[i] = (final[pick], points[pick])
        return out


def _group_by_shape(images: list[np.ndarray]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(img.shape[:2], []).append(i)
    return list(groups.values())
