"""``crfr bench ops|train|data|serve|gallery``: speed numbers as JSON."""

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

    data = kinds.add_parser("data", help="student input pipeline images/s per core, cores a GPU needs",
                            description="Runs the student's input pipeline (shards, flip, degradation, collate) "
                                        "with each worker count; prints images/s, images/s per core and how "
                                        "many cores feed one GPU.")
    add_params_args(data)
    data.add_argument("--prepared", default=None,
                      help="prepared data folder (its train/ shards); default: 4,096 images repeating real LFW "
                           "faces when LFW is configured, smooth synthetic ones otherwise")
    data.add_argument("--workers", default="0,1,2",
                      help="comma-separated loader worker counts (default: %(default)s)")
    data.add_argument("--target", type=float, default=None,
                      help="one GPU's training images/s to feed (default: 3000, iresnet50 in the paper profile)")
    data.add_argument("--json", action="store_true", help="print one JSON object")
    data.set_defaults(func=_data)

    serve = kinds.add_parser("serve", help="embedding images/s with torch and onnxruntime; HTTP load test",
                             description="Embeds a batch of real LFW faces with torch and with onnxruntime (CPU, "
                                         "the same threads), then load-tests POST /verify of crfr serve's app on "
                                         "127.0.0.1 (bounded by --requests and --max-seconds): p50/p99 latency "
                                         "and throughput.")
    add_params_args(serve)
    serve.add_argument("--model", default=None, metavar="URI",
                       help="model dir or MLflow URI (default: the configured student with random weights)")
    serve.add_argument("--images", type=int, default=64, help="faces in the batch (default: %(default)s)")
    serve.add_argument("--requests", type=int, default=200, help="HTTP requests (default: %(default)s)")
    serve.add_argument("--concurrency", type=int, default=8, help="client threads (default: %(default)s)")
    serve.add_argument("--max-seconds", type=float, default=60.0,
                       help="stop the load test after this long (default: %(default)s)")
    serve.add_argument("--json", action="store_true", help="print one JSON object")
    serve.set_defaults(func=_serve)

    gallery = kinds.add_parser("gallery", help="FAISS search latency at 10k, 100k and 1M synthetic faces",
                               description="Exact and approximate (gallery.approximate) index build time, "
                                           "single-query p50/p99 latency, batch queries/s and recall@k at each "
                                           "size, on synthetic clustered unit vectors.")
    add_params_args(gallery)
    gallery.add_argument("--sizes", default="10000,100000,1000000", help="gallery sizes (default: %(default)s)")
    gallery.add_argument("--dim", type=int, default=None, help="embedding size (default: model.embedding_size)")
    gallery.add_argument("--queries", type=int, default=200, help="queries per size (default: %(default)s)")
    gallery.add_argument("--max-seconds", type=float, default=60.0,
                         help="cap of each timing loop (default: %(default)s)")
    gallery.add_argument("--json", action="store_true", help="print one JSON object")
    gallery.set_defaults(func=_gallery)


def _print(result: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _lfw_faces(count: int = 1) -> list:
    """Real aligned faces when LFW is configured, for a representative degradation cost."""
    import itertools

    import cv2

    from crfr.config import load_params

    try:
        data = load_params().data
        from pathlib import Path

        paths = list(itertools.islice((Path(data.root) / "lfw-deepfunneled").glob("*/*_0001.jpg"), count))
    except Exception:  # no params or no LFW here: the synthetic image will do
        return []
    top, bottom, left, right = data.crop_box
    faces = []
    for path in paths:
        bgr = cv2.imread(str(path))
        if bgr is not None:
            faces.append(cv2.cvtColor(cv2.resize(bgr[top:bottom, left:right], (112, 112)), cv2.COLOR_BGR2RGB))
    return faces


def _lfw_face():
    faces = _lfw_faces(1)
    return faces[0] if faces else None


def _ops(args: argparse.Namespace) -> int:
    from crfr.bench.ops import run_ops_bench

    return _print(run_ops_bench(args.width, args.batch, args.device, image=_lfw_face(), channels_last={"auto": None, "nchw": False, "channels_last": True}[args.layout]),
                  args.json)


def _train(args: argparse.Namespace) -> int:
    from crfr.bench.train import run_train_bench
    from crfr.config import load_params

    return _print(run_train_bench(load_params(args.params, args.overrides), steps=args.steps), args.json)


def _data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from crfr.bench.data import PAPER_IMAGES_PER_S_PER_GPU, run_data_bench
    from crfr.config import load_params
    from crfr.errors import ConfigError

    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        workers = []
    if not workers or min(workers) < 0:
        raise ConfigError(f"--workers must be comma-separated counts >= 0, got {args.workers!r}")
    shards = Path(args.prepared) / "train" if args.prepared else None
    base = None
    if shards is None:
        import numpy as np

        faces = _lfw_faces(64)
        base = np.stack(faces) if faces else None
    result = run_data_bench(load_params(args.params, args.overrides), shards, workers=workers,
                            target_images_per_s=args.target or PAPER_IMAGES_PER_S_PER_GPU, base_images=base)
    return _print(result, args.json)


def _counts(text: str, flag: str) -> list[int]:
    from crfr.errors import ConfigError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} must be comma-separated counts >= 1, got {text!r}")
    return values


def _serve(args: argparse.Namespace) -> int:
    from crfr.bench.serve import run_serve_bench
    from crfr.config import load_params

    for flag, value in (("--images", args.images), ("--requests", args.requests),
                        ("--concurrency", args.concurrency)):
        _counts(str(value), flag)
    params = load_params(args.params, args.overrides)
    return _print(run_serve_bench(params, args.model, args.images, args.requests, args.concurrency,
                                  args.max_seconds), args.json)


def _gallery(args: argparse.Namespace) -> int:
    from crfr.bench.gallery import run_gallery_bench
    from crfr.config import load_params

    params = load_params(args.params, args.overrides)
    sizes = _counts(args.sizes, "--sizes")
    dim = args.dim or params.model.embedding_size
    _counts(str(dim), "--dim")
    _counts(str(args.queries), "--queries")
    return _print(run_gallery_bench(params.gallery, sizes, dim, args.queries, max_seconds=args.max_seconds),
                  args.json)
