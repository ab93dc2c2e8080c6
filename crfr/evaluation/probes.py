"""LR probes: how a verification image is made low-resolution, the synthesize step's files, and reading them.

* ``linear``: ``cv2.resize(INTER_LINEAR)`` down to the size (the paper's test protocol), low-passed first
  when ``degrade.antialias`` is set (:func:`crfr.degrade.linear_down`).
* ``realistic``: the Fig. 2 degradation model stopped at the size, with the test corruptions of
  ``evaluate.realistic`` (not training's ``degrade``: a row trained on exactly the probes' corruption would be
  favoured), seed ``evaluate.realistic_seed``, sample index = image row, so every run and every evaluator
  sees the same probes.

* ``unaligned``: a camera's probe (:mod:`crfr.evaluation.loose_boxes`): a loose box around the face of the HR
  image, drawn at seed ``evaluate.unaligned.seed`` (sample index = image row, the same box at every size),
  brought down to the probe width with its aspect ratio kept. It is handed to crfr without landmarks and
  aligned by :func:`crfr.faces.preprocess.align_loose`, as serving aligns a loose crop; the network input
  side is a probe size too (a 112 px wide crop is not the aligned HR face).

The linear and realistic probes reach the network brought back to its input size with the interpolation of
their protocol (:func:`crfr.degrade.upsample`). :func:`make_probes` is the one definition: :func:`write_probes`
(the synthesize step) stores its output, :class:`ProbeSource` reads those files back or calls it on the fly.
Sizes are ``evaluate.resolutions`` below the image size (the full size is the HR image itself), every one
for ``unaligned``. An unaligned probe file holds each crop at the top of a row of the tallest shape, its
height in ``<size>.heights.npy``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from crfr import storage
from crfr.config import DegradeCfg, Params
from crfr.data.pairs import PairSet, load_pair_set
from crfr.data.remote_shards import local_prepared
from crfr.data.shards import write_json
from crfr.degrade import Degrader, linear_down, upsample
from crfr.errors import DataError
from crfr.evaluation.loose_boxes import loose_crops, probe_sizes, show_crop

PREVIEW_ROWS_PER_SET = 3
log = logging.getLogger(__name__)


def realistic_degrade(params: Params) -> DegradeCfg:
    """The realistic protocol's corruptions: ``evaluate.realistic``, downscaled as every probe is
    (``degrade.antialias``)."""
    return params.evaluate.realistic.model_copy(update={"antialias": params.degrade.antialias})


def make_probes(images: np.ndarray, protocol: str, size: int, params: Params, rows: np.ndarray | None = None,
                progress: bool = False, desc: str = "") -> np.ndarray:
    """uint8 (len(rows), size, size, 3): images ``rows`` (default: all) made LR by ``protocol``; for
    ``unaligned`` a list of (height, size, 3) crops.

    Image row ``r`` is always degraded as sample ``r``, so a subset of rows gets exactly the probes of the
    whole set.
    """
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    if protocol == "unaligned":
        return loose_crops(images, size, params, rows, progress=progress, desc=desc)
    out = np.empty((len(rows), size, size, 3), np.uint8)
    degrader = Degrader(realistic_degrade(params), seed=params.evaluate.realistic_seed) if protocol == "realistic" else None
    for i, row in enumerate(tqdm(rows, desc=desc, unit="img", disable=not progress, leave=False)):
        img = np.asarray(images[row])
        if degrader is None:
            out[i] = linear_down(img, size, params.degrade.antialias)
        else:
            out[i] = degrader.apply_lr(img, index=int(row), size=size)[0]
    return out


def upsampler(protocol: str, out_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The per-batch transform that brings stored probes back to the network input size."""

    def transform(batch: np.ndarray) -> np.ndarray:
        return np.stack([upsample(img, out_size, protocol) for img in batch])

    return transform


class ProbeSource:
    """LR versions of an eval set's images: the synthesize step's files, or made here by :func:`make_probes`.

    Args:
        probes_dir: the synthesize output (``<set>/<protocol>/<size>.npy``); None makes the probes on the fly.
        params: for the degradation settings and the seed.
    """

    def __init__(self, probes_dir: Path | None, params: Params) -> None:
        self.dir, self.params = probes_dir, params
        self._aligned: dict[tuple, np.ndarray] = {}  # unaligned probes aligned once for every model

    @property
    def antialias(self) -> bool:
        """Whether the linear probes were low-passed before downscaling: as the stored probes record it
        (``index.json``; probes without the record were not), else ``degrade.antialias``."""
        if self.dir is None:
            return self.params.degrade.antialias
        index = self.dir / "index.json"
        if not index.is_file():
            return False
        try:
            return bool(json.loads(index.read_text()).get("antialias", False))
        except (OSError, ValueError, AttributeError) as exc:
            raise DataError(f"{index}: unreadable probes index: {exc}") from None

    def aligned_loose(self, data: PairSet, size: int, rows: np.ndarray) -> np.ndarray:
        """uint8 (len(rows), S, S, 3): the unaligned probes of ``rows`` aligned as serving aligns a loose crop
        (:func:`crfr.faces.preprocess.align_loose`, no face check). Sizes where MTCNN runs
        (``data.landmark_min_px`` and up) are aligned once for every model."""
        from crfr.faces.detect import crops_landmarks
        from crfr.faces.preprocess import align_loose

        key = (data.name, size, rows.tobytes())
        cache = self._aligned
        if key not in cache:
            out_size = int(data.images.shape[1])
            d = self.params.data
            align = {"mode": d.align, "crop_box": list(d.crop_box), "landmark_min_px": d.landmark_min_px,
                     "loose_margin": d.loose_margin}
            crops = self.get(data, "unaligned", size, rows)
            faces = np.empty((len(rows), out_size, out_size, 3), np.uint8)
            how: dict[str, int] = {}
            found = [(None, None)] * len(crops)
            if size >= d.landmark_min_px:  # MTCNN over many crops at once: ten times faster than one by one
                found = []
                for b in tqdm(range(0, len(crops), 256), desc=f"{data.name} unaligned {size}px: landmarks",
                              disable=not sys.stderr.isatty(), leave=False):
                    found += crops_landmarks(crops[b : b + 256])
            for i, crop in enumerate(crops):
                faces[i], label, _ = align_loose(crop, align, out_size, found=found[i])
                kind = label.split(" (")[0]
                how[kind] = how.get(kind, 0) + 1
            log.info("%s unaligned %dpx: %s", data.name, size, how)
            if size < d.landmark_min_px:  # placed from the box alone: cheaper than keeping it
                return faces
            cache[key] = faces
        return cache[key]

    def get(self, data: PairSet, protocol: str, size: int, rows: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """uint8 (len(rows), size, size, 3): the LR versions of images ``rows`` (``unaligned``: a list of
        crops ``size`` wide)."""
        if self.dir is None:
            return make_probes(data.images, protocol, size, self.params, rows)
        file = self.dir / data.name / protocol / f"{size}.npy"
        if not file.is_file():
            raise DataError(f"LR probes missing: {file} (run the synthesize step for set {data.name!r}, "
                            f"protocol {protocol!r}, size {size}, or leave --probes out to make them here)")
        arr = np.load(file, mmap_mode="r")
        if protocol == "unaligned":
            heights = np.load(file.with_suffix(".heights.npy"))
            if arr.ndim != 4 or arr.shape[0] != len(data.images) or arr.shape[2] != size or len(heights) != len(arr):
                raise DataError(f"{file}: shape {arr.shape} with {len(heights)} heights, expected "
                                f"({len(data.images)}, H, {size}, 3) and one height per row")
            return [np.asarray(arr[r, : heights[r]]) for r in rows]
        if arr.shape != (len(data.images), size, size, 3):
            raise DataError(f"{file}: shape {arr.shape}, expected {(len(data.images), size, size, 3)} "
                            f"(one LR image per row of eval/{data.name}/images.npy)")
        return np.asarray(arr[rows])


def preview(sets: dict[str, PairSet], probes: dict[tuple[str, str, int], np.ndarray], protocols: list[str],
            sizes: list[int], path: Path) -> None:
    """A labelled grid: per row one face (HR), then its LR versions at each size and protocol, upsampled back."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for name, ps in sets.items():
        m = len(ps.images)
        # Probe images of different pairs spread over the set: different people in LFW-style files.
        picks = sorted({int(ps.left[j]) for j in np.linspace(0, ps.num_pairs - 1, PREVIEW_ROWS_PER_SET).astype(int)})
        rows += [(name, r) for r in picks if r < m]
    cols = [("HR", None, None)] + [(f"{p} {s}px", p, s) for p in protocols for s in sizes]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.6 * len(cols), 1.75 * len(rows)), squeeze=False)
    for r, (name, row) in enumerate(rows):
        hr = np.asarray(sets[name].images[row])
        for c, (title, protocol, size) in enumerate(cols):
            if protocol is None:
                img = hr
            elif protocol == "unaligned":  # the crop as the camera gave it, brought up with its aspect kept
                img = show_crop(probes[(name, protocol, size)][row], hr.shape[0])
            else:
                img = upsample(probes[(name, protocol, size)][row], hr.shape[0], protocol)
            ax = axes[r][c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{name} #{row}", fontsize=7)
    fig.suptitle("LR probes (upsampled back for display)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_probes(prepared_dir: str, out_dir: str, params: Params, progress: bool = True) -> dict:
    """Write the LR probes of every eval set of ``prepared_dir`` to ``out_dir`` (docs/formats.md).

    Args:
        prepared_dir: the prepare step's output (local path or s3:// URI).
        out_dir: output folder or s3:// URI, published atomically by :func:`crfr.storage.output_dir`.
        params: ``data.eval_sets``, ``evaluate`` (protocols, resolutions, realistic_seed), ``degrade``.
        progress: show progress bars.

    Returns:
        The content of ``index.json``, timings included.

    Raises:
        DataError: the eval sets are missing or differ in image size.
    """
    storage.configure(params.storage)
    t0 = time.perf_counter()
    prepared = local_prepared(prepared_dir)  # the training shards are not read here
    sets = {es.name: load_pair_set(prepared / "eval" / es.name) for es in params.data.eval_sets}
    image_size = {int(ps.images.shape[1]) for ps in sets.values()}
    if len(image_size) != 1:
        raise DataError(f"{prepared}: eval sets have different image sizes {sorted(image_size)}")
    out_size = image_size.pop()
    protocols = list(dict.fromkeys(params.evaluate.protocols))
    sizes = sorted({s for s in params.evaluate.resolutions if s < out_size})
    index = {
        "sets": list(sets),
        "protocols": protocols,
        "sizes": sizes,  # unaligned: probe_sizes (the HR size too)
        "out_size": out_size,
        "seed": params.evaluate.realistic_seed,
        "antialias": params.degrade.antialias,
        "realistic": params.evaluate.realistic.model_dump(mode="json"),
        **({"unaligned": params.evaluate.unaligned.model_dump(mode="json"), "align": params.data.align,
            "crop_box": list(params.data.crop_box)} if "unaligned" in protocols else {}),
        "images": {name: int(len(ps.images)) for name, ps in sets.items()},
    }
    with storage.output_dir(out_dir) as stage:
        probes: dict[tuple[str, str, int], np.ndarray] = {}
        for name, ps in sets.items():
            for protocol in protocols:
                for size in probe_sizes(protocol, params.evaluate.resolutions, out_size):
                    arr = make_probes(ps.images, protocol, size, params, progress=progress,
                                      desc=f"{name} {protocol} {size}px")
                    # Plain writes: the staging folder is published only once all of it is written.
                    (stage / name / protocol).mkdir(parents=True, exist_ok=True)
                    probes[(name, protocol, size)] = arr
                    if protocol == "unaligned":
                        heights = np.asarray([c.shape[0] for c in arr], np.int64)
                        padded = np.zeros((len(arr), int(heights.max(initial=1)), size, 3), np.uint8)
                        for i, crop in enumerate(arr):
                            padded[i, : len(crop)] = crop
                        np.save(stage / name / protocol / f"{size}.heights.npy", heights, allow_pickle=False)
                        arr = padded
                    np.save(stage / name / protocol / f"{size}.npy", arr, allow_pickle=False)
        if sizes and protocols:
            preview(sets, probes, protocols, sizes, stage / "preview.png")
        index["timings_s"] = {"total": round(time.perf_counter() - t0, 2)}
        write_json(stage / "index.json", index)
    return index
