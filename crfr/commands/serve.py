"""``crfr serve``: the HTTP service (POST /embed, /verify, /identify; GET / and /health), see crfr/serve/http.py."""

from __future__ import annotations

import argparse


TOKEN_ENV = "CRFR_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args) -> int:
    import os

    from crfr.cli import configure_logging
    from crfr.commands.model_option import params_of
    from crfr.errors import ConfigError
    from crfr.registry.resolve import champion_uri
    from crfr.serve.http import create_app, run
    from crfr.serve.live import Live, Served, load_served

    configure_logging()
    params = params_of(args)
    cfg = params.serve
    host, port = args.host or cfg.host, args.port or cfg.port
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must lie in 1..65535, got {port}")
    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not args.no_auth and host not in LOOPBACK:
        # A face API open to a network is a biometric database open to it: refuse rather than fail open.
        raise ConfigError(f"crfr serve on {host}: set {TOKEN_ENV} (clients send Authorization: Bearer <token>), "
                          "or pass --no-auth to serve without authentication")
    ref = args.model or champion_uri(params)
    served = load_served(ref, params, gallery=args.gallery)
    if args.onnx:
        from crfr.serve.onnx_embedder import OnnxFaceEmbedder

        onnx_embedder = OnnxFaceEmbedder(args.onnx)
        if onnx_embedder.fingerprint != served.embedder.fingerprint:
            from crfr.errors import DataError

            raise DataError(f"{args.onnx} was exported from another model than {served.source.describe()}; export "
                            f"this one with crfr export onnx {served.source.uri} --out {args.onnx}")
        served = Served(onnx_embedder, served.source, served.gallery, served.gallery_uri, {"onnx": args.onnx})
        ref = served.source.load_uri  # an export is of one version: pinned, not following the alias
    live = Live(served, ref, params)
    app = create_app(live, cfg, top_k=params.gallery.top_k, token=token)
    gallery = served.gallery
    print(f"crfr serve: {served.source.describe()} ({'onnxruntime' if args.onnx else 'torch'})"
          + (f", gallery {served.gallery_uri} ({gallery.count} faces)" if gallery else ", no gallery")
          + (f", following {ref} every {cfg.alias_poll_s:g} s" if live.following else "")
          + (", token required" if token else ", NO authentication")
          + f" on http://{host}:{port}", flush=True)
    live.start()
    try:
        run(app, host, port, max_connections=cfg.max_connections)
    finally:
        live.stop()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from crfr.cli import add_params_args
    from crfr.commands.model_option import add_model_option

    p = sub.add_parser(
        "serve", help="HTTP service: POST /embed, /verify, /identify (multipart images)",
        description="Serve the model over HTTP: POST /verify with image fields a and b answers the distance, "
                    "threshold and decision; POST /embed and POST /identify take the field image; GET / is a page "
                    "for people, GET /health answers 200, GET /metrics is Prometheus. With --model "
                    "models:/NAME@ALIAS the alias is re-read every serve.alias_poll_s seconds and model and "
                    "gallery are swapped together when it moves; every answer names its model_version. With "
                    f"{TOKEN_ENV} set, every route but / and /health needs Authorization: Bearer <token>. Uploads "
                    "are limited by serve.max_image_bytes and serve.max_image_pixels; bad input gets a 4xx JSON "
                    "error.")
    p.add_argument("--host", default=None, help="address to listen on (default: serve.host)")
    p.add_argument("--port", type=int, default=None, help="port (default: serve.port)")
    add_model_option(p)
    p.add_argument("--gallery", default=None, metavar="DIR",
                   help="one gallery for /identify whatever the version, local or s3:// (default: the version's own "
                        "gallery in the gallery home serve.gallery)")
    p.add_argument("--onnx", default=None, metavar="FILE.onnx",
                   help="run the network with onnxruntime from this export of the same model (pins the version)")
    p.add_argument("--no-auth", action="store_true",
                   help=f"serve without a token on a non-loopback address (default: {TOKEN_ENV} is required there)")
    add_params_args(p)
    p.set_defaults(func=cmd_serve)
