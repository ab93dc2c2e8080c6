"""Where faces come from: the training data, its alignment and split, and the verification benchmarks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from crfr.config.base import Bool, Float, Int, Section

LFW_ROOT_ENV = "CRFR_LFW_ROOT"  # overrides data.root (crfr.config.load.ENV_KEYS)


class EvalSetCfg(Section):
    """One verification benchmark."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["lfw", "bin", "csv", "cfp"]
    path: str | None = Field(
        default=None,
        description="LFW or CFP folder, .bin or .csv (local path or s3:// URI); null means data.root (lfw) or "
                    "data.cfp_root (cfp)",
    )
    image_root: str | None = Field(default=None, description="csv only: root the pair paths are relative to")
    protocol: Literal["FF", "FP"] | None = Field(
        default=None, description="cfp only (required): FF frontal-frontal or FP frontal-profile"
    )
    folds: list[Int] | None = Field(
        default=None, description="lfw: View 2 folds (1-10); cfp: its folds (1-10); null means all"
    )
    max_pairs: Int | None = Field(
        default=None, ge=2, description="keep N pairs spread evenly over folds and labels (time budgets, smoke runs)"
    )
    align: Literal["fixed", "detect", "none"] | None = Field(
        default=None,
        description="fixed: data.align as training images get it (same framing as the training data); detect: "
                    "MTCNN finds each face, then data.align is placed on it (photos framed otherwise, as "
                    "serving does); none: already aligned. null: fixed for lfw, none for bin, detect for cfp/csv",
    )

    @model_validator(mode="after")
    def _kind_options(self) -> "EvalSetCfg":
        if self.kind == "cfp" and self.protocol is None:
            raise ValueError(f"eval set {self.name!r}: kind cfp needs protocol: FF or FP")
        if self.kind != "cfp" and self.protocol is not None:
            raise ValueError(f"eval set {self.name!r}: protocol applies to kind cfp only")
        if self.kind in ("bin", "csv") and self.path is None:
            raise ValueError(f"eval set {self.name!r}: kind {self.kind} needs a path (local or s3://)")
        if self.folds is not None and self.kind not in ("lfw", "cfp"):
            raise ValueError(f"eval set {self.name!r}: folds applies to kinds lfw and cfp (a CSV has a fold column)")
        return self

    @property
    def alignment(self) -> str:
        """The effective ``align`` (its null resolved by kind)."""
        if self.align is not None:
            return self.align
        return {"lfw": "fixed", "bin": "none"}.get(self.kind, "detect")


class DataCfg(Section):
    """Where faces come from and how they are aligned and split."""

    root: str = Field(
        default="../shared/data/lfw",
        description=f"LFW-style root (images + pairs.txt); the {LFW_ROOT_ENV} environment variable overrides",
    )
    cfp_root: str | None = Field(
        default=None, description="CFP-FP folder (Data/, Protocol/) of the cfp eval sets that name no path; DVC's "
                                  "prepare stage depends on it and on root, so swapping either re-runs prepare",
    )
    download: Bool = Field(default=True, description="download LFW from the public mirror when root is missing")
    download_dir: str = "data/downloads"
    images_subdir: str = Field(default="lfw-deepfunneled", description="image folder inside root")
    train: Literal["lfw", "recordio"] = "lfw"
    train_rec: str | None = Field(default=None, description="insightface train.rec (train.idx beside it)")
    eval_sets: list[EvalSetCfg] = Field(
        default_factory=lambda: [EvalSetCfg(name="lfw", kind="lfw", folds=[9, 10])], min_length=1
    )
    align: Literal["mtcnn", "center-crop", "none"] = "center-crop"
    crop_box: tuple[Int, Int, Int, Int] = Field(
        default=(64, 186, 70, 180), description="center-crop: (top, bottom, left, right) in source pixels"
    )
    image_size: Int = Field(default=112, ge=32, le=512)
    min_face_size: Int = Field(
        default=12, ge=1, description="embed/verify/identify/serving: a smaller face (pixels across) is refused"
    )
    lr_crops: Literal["auto", "loose", "aligned"] = Field(
        default="auto",
        description="embed/verify/identify/serving: what an image no larger than the input is: loose (a "
                    "detector's box around the face, placed from landmarks or from the box alone), aligned (the "
                    "paper's aligned crop, resized as it is); auto: square images aligned, any other shape loose",
    )
    landmark_min_px: Int = Field(
        default=12, ge=1,
        description="a loose crop at least this wide (smaller side) is aligned on the landmarks MTCNN finds in "
                    "it brought up to 112 px; a smaller one from its box alone (crfr.faces.placement). 12: "
                    "landmarks beat the box by 7 to 13 points at 14-28 px on validation (docs/results/README.md)",
    )
    loose_margin: Float = Field(
        default=1.15, gt=0.5, le=3.0,
        description="how much wider and taller a loose crop is than MTCNN's box around the same face",
    )
    min_images_per_identity: Int = Field(default=4, ge=1)
    max_images_per_identity: Int = Field(default=30, ge=1)
    max_identities: Int | None = Field(
        default=None, ge=2, description="keep only the first N identities (and, with unlabelled, the first N "
                                        "unlabelled people)"
    )
    unlabelled: Bool = Field(
        default=False, description="train: lfw: the people with fewer than min_images_per_identity images "
                                   "(outside every eval set and the validation split) join the training set "
                                   "without a label: no ArcFace, only what an adopted teacher (teacher.source "
                                   "onnx | dlib) gives of them: its logits (Eq. 2) and embeddings (lambda_match)",
    )
    max_bad_fraction: Float = Field(
        default=0.01, ge=0.0, le=1.0, description="unreadable images skipped (and counted) below this fraction"
    )
    shard_size: Int = Field(default=4096, ge=1)
    num_workers: Int = Field(default=0, ge=0)
    validation_identities: Int = Field(
        default=0, ge=0,
        description="people (>= 2 images, outside every eval set) held out of training for validation pairs: the "
                    "per-epoch accuracy and the choice of settings; 0: no validation split",
    )
    validation_pairs: Int = Field(default=600, ge=2, description="validation pairs, half same, half different")
    align_cache: Bool = Field(
        default=True, description="cache MTCNN-aligned faces (align: mtcnn, and eval sets aligned by detect) under "
                                  "storage.cache_dir, keyed by image bytes and alignment settings: MTCNN runs "
                                  "once per image, not once per run",
    )

    @model_validator(mode="after")
    def _check(self) -> "DataCfg":
        if self.max_images_per_identity < self.min_images_per_identity:
            raise ValueError("max_images_per_identity must be >= min_images_per_identity")
        if self.train == "recordio" and not self.train_rec:
            raise ValueError("train: recordio needs train_rec (path or s3:// URI of train.rec)")
        if self.unlabelled and self.train != "lfw":
            raise ValueError("unlabelled: true needs train: lfw (a .rec labels every record)")
        for es in self.eval_sets:
            if es.kind == "cfp" and es.path is None:
                if not self.cfp_root:
                    raise ValueError(f"eval set {es.name!r}: kind cfp needs a path, or data.cfp_root")
                es.path = self.cfp_root
        names = [s.name for s in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval_sets names must be unique, got {names}")
        return self
