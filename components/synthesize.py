"""Step 2: make the LR probes of every verification set (and, optionally, LR training variants).

DVC, Kubeflow and Prefect call :func:`synthesize`; ``python -m components.synthesize`` and
``crfr data synthesize`` are its command lines. Output layout: docs/formats.md (``<set>/<protocol>/<size>.npy``,
``index.json``, ``preview.png``), published atomically through :func:`crfr.storage.output_dir`.

* ``linear``: ``cv2.resize(INTER_LINEAR)`` down to the size (the paper's test protocol).
* ``realistic``: the Fig. 2 degradation model stopped at the size, seed ``evaluate.realistic_seed``,
  sample index = image row, so every run and every evaluator sees the same probes.

Sizes are ``evaluate.resolutions`` below the image size (the full size is the HR image itself).

``train_variants=K`` also writes ``train_lr/``: K degraded versions of every training image, brought back to
the image size (shard format of ``train/``; image ``i * K + k`` is variant ``k`` of training image ``i``,
degraded as sample ``i * K + k`` with seed ``seed``), for clusters whose CPUs cannot degrade on the fly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from crfr import storage
from crfr.cli import add_params_args, step_main
from crfr.config import Params, load_params
from crfr.data.pairs import PairSet, load_pair_set
from crfr.data.shards import ShardDataset, ShardWriter, write_json
from crfr.degrade import Degrader, resize, upsample
from crfr.errors import DataError

PREVIEW_ROWS_PER_SET = 3


def make_probes(images: np.ndarray, protocol: str, size: int, params: Params, progress: bool = False,
                desc: str = "") -> np.ndarray:
    """uint8 (M, size, size, 3): every image made LR by ``protocol``; row ``i`` is degraded as sample ``i``."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    degrader = Degrader(params.degrade, seed=params.evaluate.realistic_seed) if protocol == "realistic" else None
    for i in tqdm(range(len(images)), desc=desc, unit="img", disable=not progress, leave=False):
        img = np.asarray(images[i])
        if degrader is None:
            out[i] = resize(img, size, cv2.INTER_LINEAR)
        else:
            out[i] = degrader.apply_lr(img, index=i, size=size)[0]
    return out


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


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
            img = hr if protocol is None else upsample(probes[(name, protocol, size)][row], hr.shape[0], protocol)
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


def synthesize_train(train: ShardDataset, out: Path, params: Params, variants: int, progress: bool) -> dict:
    """K degraded LR variants of every training image, back at the image size, as shards."""
    degrader = Degrader(params.degrade, seed=params.seed, corrupt=params.student.lr_data == "degraded")
    size = train.image_size
    writer = ShardWriter(out, params.data.shard_size, size)
    labels = np.repeat(train.labels, variants)
    for i in tqdm(range(len(train)), desc="train_lr", unit="img", disable=not progress, leave=False):
        img, label = train[i]
        for k in range(variants):
            low = degrader(img, i * variants + k)
            writer.add(low if low.shape[0] == size else cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC),
                       label)
    index = writer.close(train.classes, labels=labels,
                         extra={"variants": variants, "seed": params.seed, "lr_data": params.student.lr_data})
    return {"images": index["num_images"], "variants": variants}


def synthesize(prepared_dir: str, out_dir: str, params: Params, train_variants: int = 0, progress: bool = True) -> dict:
    """Write the LR probes of every eval set of ``prepared_dir`` to ``out_dir``.

    Args:
        prepared_dir: the prepare step's output (local path or s3:// URI).
        out_dir: output folder or s3:// URI (replaced atomically).
        params: ``data.eval_sets``, ``evaluate`` (protocols, resolutions, realistic_seed), ``degrade``.
        train_variants: K > 0 also writes K degraded variants of every training image to ``train_lr/``.
        progress: show progress bars.

    Returns:
        The content of ``index.json`` plus timings.
    """
    if train_variants < 0:
        raise DataError(f"train_variants must be >= 0, got {train_variants}")
    storage.configure(params.storage)
    t0 = time.perf_counter()
    prepared = storage.local_input(prepared_dir, kind="dir")
    sets = {es.name: load_pair_set(prepared / "eval" / es.name) for es in params.data.eval_sets}
    image_size = {int(ps.images.shape[1]) for ps in sets.values()}
    if len(image_size) != 1:
        raise DataError(f"{prepared}: eval sets have different image sizes {sorted(image_size)}")
    out_size = image_size.pop()
    sizes = sorted({s for s in params.evaluate.resolutions if s < out_size})
    protocols = list(dict.fromkeys(params.evaluate.protocols))
    index = {
        "sets": list(sets),
        "protocols": protocols,
        "sizes": sizes,
        "out_size": out_size,
        "seed": params.evaluate.realistic_seed,
        "images": {name: int(len(ps.images)) for name, ps in sets.items()},
    }
    with storage.output_dir(out_dir) as stage:
        probes: dict[tuple[str, str, int], np.ndarray] = {}
        for name, ps in sets.items():
            for protocol in protocols:
                for size in sizes:
                    arr = make_probes(ps.images, protocol, size, params, progress, f"{name} {protocol} {size}px")
                    _save(stage / name / protocol / f"{size}.npy", arr)
                    probes[(name, protocol, size)] = arr
        if sizes and protocols:
            preview(sets, probes, protocols, sizes, stage / "preview.png")
        if train_variants:
            train = ShardDataset(prepared / "train")
            index["train_lr"] = synthesize_train(train, stage / "train_lr", params, train_variants, progress)
        index["timings_s"] = {"total": round(time.perf_counter() - t0, 2)}
        write_json(stage / "index.json", index)
    return index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``python -m components.synthesize`` and ``crfr data synthesize``."""
    add_params_args(parser)
    parser.add_argument("--prepared", required=True, help="prepare step output (folder or s3:// URI)")
    parser.add_argument("--out", required=True, help="output folder or s3:// URI (replaced atomically)")
    parser.add_argument("--train-variants", type=int, default=0, metavar="K",
                        help="also write K degraded LR variants of every training image to train_lr/ (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params, args.overrides)
    index = synthesize(args.prepared, args.out, params, args.train_variants, progress=not args.no_progress)
    print(f"LR probes written to {args.out}: sets {index['sets']}, protocols {index['protocols']}, "
          f"sizes {index['sizes']} ({index['timings_s']['total']} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return step_main("synthesize", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
