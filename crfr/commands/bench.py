"""``crfr bench ops|train|data``: speed numbers as JSON."""

from __future__ import annotations

import argparse
import json

from crfr.cli import add_params_args


def register(sub) -> None:
    bench = sub.add_parser("bench", help="speed benchmarks (JSON numbers, medians after warm-up)",
                           description="Speed benchmarks. Each prints one JSON object with --json.")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)

    ops = kinds.add_parser("ops", help="LL filters, WaveResNet step overhead, degradation throughput",
                           description="LL filter fwd+bwd on (64, 64, 56, 56); iresnet18 vs WaveResNet18 train "
                                       "step at 112x112; degradation images/s on one core.")
    ops.add_argument("--width", type=float, default=1.0, help="iresnet18 width multiplier (default: %(default)s)")
    ops.add_argument("--batch", type=int, default=32, help="batch size of the step ratio (default: %(default)s)")
    ops.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ops.add_argument("--layout", choices=("auto", "nchw", "channels_last"), default="auto",
                     help="tensor layout (default: training's: channels_last on CUDA, nchw on CPU)")
    ops.add_argument("--json", action="store_true", help="print one JSON object")
    ops.set_defaults(func=_ops)

    train = kinds.add_parser("train", help="teacher/student images/s and MFU for the configured model",
                             description="Training throughput of teacher and student with the model and batch "
                                         "sizes in params (e.g. --set profile=paper for iresnet50 on a GPU).")
    add_params_args(train)
    train.add_argument("--steps", type=int, default=3, help="timed steps per model (default: %(default)s)")
    train.add_argument("--json", action="store_true", help="print one JSON object")
    train.set_defaults(func=_train)

    data = kinds.add_parser("data", help="prepared-data loader throughput and peak RAM",
                            description="Iterates the training loader over prepared shards with the configured "
                                        "workers; prints images/s and peak RSS.")
    add_params_args(data)
    data.add_argument("--prepared", default=None,
                      help="prepared data folder (its train/ shards); default: 4,096 synthetic images")
    data.add_argument("--json", action="store_true", help="print one JSON object")
    data.set_defaults(func=_data)


def _print(result: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _lfw_face():
    """A real aligned face when LFW is configured, for a representative degradation cost."""
    import cv2

    from crfr.config import load_params

    try:
        root = load_params().data.root
        from pathlib import Path

        path = next((Path(root) / "lfw-deepfunneled").glob("*/*_0001.jpg"))
    except Exception:  # no params or no LFW here: the synthetic image will do
        return None
    bgr = cv2.imread(str(path))
    return None if bgr is None else cv2.cvtColor(cv2.resize(bgr[64:186, 70:180], (112, 112)), cv2.COLOR_BGR2RGB)


def _ops(args: argparse.Namespace) -> int:
    from crfr.bench import run_ops_bench

    return _print(run_ops_bench(args.width, args.batch, args.device, image=_lfw_face(), channels_last={"auto": None, "nchw": False, "channels_last": True}[args.layout]),
                  args.json)


def _train(args: argparse.Namespace) -> int:
    from crfr.bench import run_train_bench
    from crfr.config import load_params

    return _print(run_train_bench(load_params(args.params, args.overrides), steps=args.steps), args.json)


def _data(args: argparse.Namespace) -> int:
    from crfr.bench_data import run_data_bench
    from crfr.config import load_params

    from pathlib import Path

    shards = Path(args.prepared) / "train" if args.prepared else None
    return _print(run_data_bench(load_params(args.params, args.overrides), shards), args.json)
