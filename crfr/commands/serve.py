"""``crfr serve``: the HTTP service (POST /embed, /verify, /identify; GET / and /health), see crfr/serve/http.py."""

from __future__ import annotations

import argparse


def cmd_serve(args) -> int:
    from crfr.cli import configure_logging
    from crfr.commands.model_option import open_model_of
    from crfr.serve.http import create_app, run

    configure_logging()
    params, embedder, source = open_model_of(args)
    cfg = params.serve
    model = source.to_dict() | {"described": source.describe(), "fingerprint": embedder.fingerprint}
    if args.onnx:
        from crfr.serve.onnx_embedder import OnnxFaceEmbedder

        onnx_embedder = OnnxFaceEmbedder(args.onnx)
        if onnx_embedder.fingerprint != embedder.fingerprint:
            from crfr.errors import DataError

            raise DataError(f"{args.onnx} was exported from another model than {source.describe()}; export this "
                            f"one with crfr export onnx {source.uri} --out {args.onnx}")
        embedder, model["onnx"] = onnx_embedder, args.onnx
    gallery_uri = args.gallery or cfg.gallery
    gallery = None
    if gallery_uri:
        from crfr.gallery import Gallery

        gallery = Gallery.load(gallery_uri)
        gallery.check_model(embedder, source.describe())
    app = create_app(embedder, cfg, gallery, model, top_k=params.gallery.top_k)
    host = args.host or cfg.host
    port = args.port or cfg.port
    if not 1 <= port <= 65535:
        from crfr.errors import ConfigError

        raise ConfigError(f"--port must lie in 1..65535, got {port}")
    print(f"crfr serve: {source.describe()} ({'onnxruntime' if args.onnx else 'torch'})"
          + (f", gallery {gallery_uri} ({gallery.count} faces)" if gallery else ", no gallery")
          + f" on http://{host}:{port}", flush=True)
    run(app, host, port)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from crfr.cli import add_params_args
    from crfr.commands.model_option import add_model_option

    p = sub.add_parser(
        "serve", help="HTTP service: POST /embed, /verify, /identify (multipart images)",
        description="Serve the model over HTTP: POST /verify with image fields a and b answers the distance, "
                    "threshold and decision; POST /embed and POST /identify take the field image; GET / and "
                    "/health answer 200. Uploads are limited by serve.max_image_bytes and "
                    "serve.max_image_pixels; bad input gets a 4xx JSON error.")
    p.add_argument("--host", default=None, help="address to listen on (default: serve.host)")
    p.add_argument("--port", type=int, default=None, help="port (default: serve.port)")
    add_model_option(p)
    p.add_argument("--gallery", default=None, metavar="DIR",
                   help="gallery for /identify, local or s3:// (default: serve.gallery)")
    p.add_argument("--onnx", default=None, metavar="FILE.onnx",
                   help="run the network with onnxruntime from this export of the same model")
    add_params_args(p)
    p.set_defaults(func=cmd_serve)
