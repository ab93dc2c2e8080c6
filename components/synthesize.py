"""Step 2: make the LR probes of every verification set, at every resolution and protocol, and a preview sheet.

DVC, Kubeflow and Prefect call :func:`synthesize`; ``python -m components.synthesize`` and
``crfr data synthesize`` are its command lines. What a probe is (linear and realistic protocols) is defined
once, in :mod:`crfr.evaluation.probes`, which the evaluate step also uses to make probes on the fly. Output
layout: docs/formats.md (``<set>/<protocol>/<size>.npy``, ``index.json``, ``preview.png``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from crfr.cli import add_params_args, step_main
from crfr.config import Params, load_params


def synthesize(prepared_dir: str, out_dir: str, params: Params, progress: bool = True) -> dict:
    """Write the LR probes of every eval set of ``prepared_dir`` to ``out_dir``.

    Args:
        prepared_dir: the prepare step's output (local path or s3:// URI).
        out_dir: output folder or s3:// URI (replaced atomically).
        params: ``data.eval_sets``, ``evaluate`` (protocols, resolutions, realistic_seed), ``degrade``.
        progress: show progress bars.

    Returns:
        The content of ``index.json`` plus timings.
    """
    from crfr.evaluation.probes import write_probes

    return write_probes(prepared_dir, out_dir, params, progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``python -m components.synthesize`` and ``crfr data synthesize``."""
    add_params_args(parser)
    parser.add_argument("--prepared", required=True, help="prepare step output (folder or s3:// URI)")
    parser.add_argument("--out", required=True, help="output folder or s3:// URI (replaced atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params, args.overrides)
    index = synthesize(args.prepared, args.out, params, progress=not args.no_progress)
    print(f"LR probes written to {args.out}: sets {index['sets']}, protocols {index['protocols']}, "
          f"sizes {index['sizes']} ({index['timings_s']['total']} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return step_main("synthesize", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
