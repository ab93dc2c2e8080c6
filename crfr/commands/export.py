"""``crfr export onnx``: a registered version, an alias or a model folder as an ONNX file (dynamic batch)."""

from __future__ import annotations

import argparse


def cmd_onnx(args) -> int:
    from crfr.commands.model_option import open_model_of
    from crfr.registry.register import log_beside_version
    from crfr.serve.onnx_export import export_onnx

    params, embedder, source = open_model_of(args)
    summary = export_onnx(embedder, args.out, source, exporter=args.exporter, opset=args.opset)
    print(f"exported {source.describe()} to {args.out} ({summary['exporter']} exporter, opset {summary['opset']}, "
          f"{summary['bytes'] / 1e6:.1f} MB, input (batch, 3, {embedder.input_size}, {embedder.input_size}), "
          f"output (batch, {summary['embedding_size']}))")
    if summary["reference_filters_swapped"]:
        print(f"  {summary['reference_filters_swapped']} pytorch_wavelets LL filters exported as the fast filter")
    print(f"onnxruntime agrees with torch: largest cosine deviation {summary['max_cosine_deviation']:.2e}")
    if args.no_log:
        return 0
    uri = log_beside_version(source, args.out, params)
    if uri is None:
        print("not logged to MLflow: the model is a local folder, not a registered version")
    else:
        tagged = f" (tag 'onnx' on {source.name} version {source.version})" if source.version else ""
        print(f"logged beside the model as {uri}{tagged}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from crfr.cli import add_params_args

    export = sub.add_parser("export", help="export a model for other runtimes (ONNX)",
                            description="Export a model for other runtimes.")
    kinds = export.add_subparsers(dest="export_kind", metavar="FORMAT", required=True)
    p = kinds.add_parser(
        "onnx", help="the flip-augmented, L2-normalised embedding as ONNX, dynamic batch",
        description="Write MODEL as an ONNX file: input 'input' float32 (N, 3, 112, 112) in [-1, 1], output "
                    "'embedding' (N, D), unit rows, the same as crfr embed computes; the thresholds, alignment "
                    "and model fingerprint are in its metadata. Checked against torch with onnxruntime, then "
                    "logged as an artifact of the registered version's run (tag 'onnx' on the version).")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="model dir or MLflow URI (default: models:/<registry.student_name>@champion)")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="where to write it (local path or s3://)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.export-based (default) or the deprecated TorchScript exporter")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-log", action="store_true", help="do not log the file to MLflow")
    add_params_args(p)
    p.set_defaults(func=cmd_onnx)
