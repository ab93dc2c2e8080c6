"""Step 1: prepare aligned training shards and verification sets from raw face data.

DVC, Kubeflow and Prefect call :func:`prepare`; ``python -m components.prepare`` and ``crfr data prepare`` are
its command lines. The work is :mod:`crfr.data.prepare` (verification sets: :mod:`crfr.data.eval_sets`;
training set: :mod:`crfr.data.train_set`; decoding and alignment: :mod:`crfr.data.decode`). Output layout:
docs/formats.md (``train/``, ``eval/<set>/``, ``manifest.csv``, ``report.json``), published atomically.

Training data (``data.train``): ``lfw`` (identities outside every evaluated pair) or ``recordio`` (an
insightface ``train.rec``). Verification sets (``data.eval_sets``): ``lfw``, ``bin`` or ``csv``; ``max_pairs``
keeps a balanced subset. Unreadable images are skipped and counted, up to ``data.max_bad_fraction``; a
training image byte-identical to an evaluation image is left out and reported. Only the default data is
ever downloaded; a source that does not exist is an error naming it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from crfr.cli import add_params_args, step_main
from crfr.config import Params, load_params

# crfr.data.prepare (NumPy, OpenCV) is imported where used: `crfr --help` builds this parser.


def prepare(source: str | None, out_dir: str, params: Params, progress: bool = True) -> dict:
    """Prepare training shards and verification sets.

    Args:
        source: LFW root (local path or s3:// URI); with ``data.train: recordio`` a path ending in ``.rec``
            is the training file instead. None means ``data.root`` / ``data.train_rec``.
        out_dir: output folder or s3:// URI (replaced atomically).
        params: settings (``data``, ``evaluate.nfolds``, ``seed``).
        progress: show progress bars.

    Returns:
        The summary also written to ``report.json``.
    """
    from crfr.data.prepare import write_prepared

    return write_prepared(source, out_dir, params, progress)


def summary_line(report: dict) -> str:
    train = report["train"]
    evals = ", ".join(f"{n}: {e['pairs']} pairs / {e['images']} images" for n, e in report["eval"].items())
    copies = train.get("identical_to_eval", {}).get("removed_from_train", 0)
    removed = f" ({copies} identical to eval images removed)" if copies else ""
    return (f"train: {train['identities']} identities, {train['images']} images{removed}; eval {evals}; "
            f"{report['timings_s']['total']} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``python -m components.prepare`` and ``crfr data prepare``."""
    add_params_args(parser)
    parser.add_argument("--source", default=None,
                        help="LFW root or train.rec (data.train: recordio), local or s3://; default: data.root / "
                             "data.train_rec")
    parser.add_argument("--out", required=True, help="output folder or s3:// URI (replaced atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params, args.overrides)
    report = prepare(args.source, args.out, params, progress=not args.no_progress)
    print(f"prepared {args.out}: {summary_line(report)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return step_main("prepare", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
