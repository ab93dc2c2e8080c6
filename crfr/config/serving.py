"""Serving a model: 1:N search over an enrolled gallery and the HTTP service."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from crfr.config.base import Float, Int, Section


class GalleryCfg(Section):
    """1:N search over an enrolled gallery (``crfr gallery``): the FAISS index and the open-set threshold."""

    exact_max: Int = Field(
        default=50_000, ge=1,
        description="galleries up to this many faces are searched exactly; larger ones approximately",
    )
    approximate: Literal["ivf", "hnsw"] = Field(default="ivf", description="the approximate index beyond exact_max")
    ivf_nlist: Int | None = Field(default=None, ge=1, description="IVF cells; null: sqrt(faces)")
    ivf_nprobe: Int = Field(default=64, ge=1, description="IVF cells visited per query (recall against speed)")
    hnsw_m: Int = Field(default=32, ge=4, le=256)
    hnsw_ef_search: Int = Field(default=128, ge=1)
    recall_k: Int = Field(default=10, ge=1, description="recall@k of an approximate index against exact search")
    recall_queries: Int = Field(default=1000, ge=1, description="gallery faces used as queries for that recall")
    target_recall: Float = Field(
        default=0.95, ge=0.0, le=1.0,
        description="an approximate index searches wider (IVF nprobe, HNSW efSearch) until its recall@k reaches this",
    )
    top_k: Int = Field(default=5, ge=1, description="identities answered per probe")
    calibration_probes: Int = Field(
        default=500, ge=0,
        description="gallery faces probed leave-one-out, per resolution, to calibrate the open-set threshold; 0: "
                    "use the model's verification thresholds",
    )
    min_calibration_pairs: Int = Field(
        default=10, ge=1, description="genuine and impostor scores each needed to calibrate; else the model's threshold"
    )


class ServeCfg(Section):
    """``crfr serve``: the HTTP service for embed, verify and identify."""

    host: str = "127.0.0.1"
    port: Int = Field(default=8080, ge=1, le=65535)
    gallery: str | None = Field(
        default=None, description="gallery home: a folder or s3:// prefix holding one gallery per model version "
                                  "(<name>-v<version>; crfr gallery build --model, crfr promote); null: none"
    )
    alias_poll_s: float = Field(
        default=30.0, ge=0, description="how often crfr serve --model models:/NAME@ALIAS asks where the alias "
                                        "points, swapping model and gallery when it moved; 0: never"
    )
    max_batch: Int = Field(default=16, ge=1, description="faces of concurrent requests embedded in one forward pass")
    batch_wait_ms: float = Field(default=5.0, ge=0, le=1000, description="how long queued faces wait for company")
    read_timeout_s: float = Field(
        default=30.0, gt=0, description="a request body whose next chunk takes longer is answered 408"
    )
    max_connections: Int = Field(default=256, ge=1, description="open connections; beyond, a request gets a 503")
    max_image_bytes: Int = Field(default=8 * 1024 * 1024, ge=1024, description="largest accepted upload per image")
    max_image_pixels: Int = Field(
        default=40_000_000, ge=1024, description="largest accepted width x height (refuses decompression bombs)"
    )
