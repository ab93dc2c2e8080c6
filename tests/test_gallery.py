"""``crfr gallery`` and ``crfr identify --gallery``: enrolment of real LFW faces, FAISS search, open-set decisions."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from crfr.cli import main
from crfr.config import GalleryCfg
from crfr.faces.images import read_image
from crfr.gallery import Gallery, GalleryError, add, build, build_index, is_gallery, list_source
from crfr.gallery.index import measure_recall
from crfr.gallery.store import UNKNOWN
from crfr.serve.embedder import FaceEmbedder
from tests.facedata import IMAGES, image_path, params_file, require_lfw, save_random_model

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
FIVE = ["Serena_Williams", "Tony_Blair", "Colin_Powell", "George_W_Bush", "Hugo_Chavez"]
RESOLUTIONS = (14, 112)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    require_lfw()
    folder = save_random_model(tmp_path_factory.mktemp("gallery") / "model", seed=11, backbone="waveresnet")
    # The model's own verification thresholds: what a gallery too small to calibrate falls back to.
    (folder / "thresholds.json").write_text(json.dumps({"14": 0.02, "112": 0.01}))
    return folder


@pytest.fixture(scope="module")
def embedder(model_dir):
    return FaceEmbedder.from_dir(model_dir)


def identity_folder(root: Path, people: list[str], numbers=(1,)) -> Path:
    for person in people:
        (root / person).mkdir(parents=True, exist_ok=True)
        for n in numbers:
            shutil.copy(image_path(person, n), root / person)
    return root


def people_with(minimum: int, count: int) -> list[str]:
    return [p.name for p in sorted(IMAGES.iterdir()) if len(list(p.glob("*.jpg"))) >= minimum][:count]


def test_build_identify_and_unknown(embedder, tmp_path):
    source = identity_folder(tmp_path / "enrol", FIVE)
    g, skipped = build(source, embedder, GalleryCfg(), RESOLUTIONS)
    assert skipped == [] and g.count == 5 and sorted(set(g.identities)) == sorted(FIVE)
    assert g.manifest["index"]["kind"] == "flat" and g.manifest["index"]["exact"]
    assert g.manifest["model"]["fingerprint"] == embedder.fingerprint
    # One face per identity: no genuine scores to calibrate with, so the model's thresholds are used.
    assert g.thresholds["112"] == {"value": 0.01, "source": "model", "genuine": 0, "impostor": 5}
    g.save(tmp_path / "gallery")
    assert is_gallery(tmp_path / "gallery") and not is_gallery(source)

    loaded = Gallery.load(tmp_path / "gallery")
    np.testing.assert_array_equal(loaded.embeddings, g.embeddings)
    # An enrolled photo finds itself first, at distance ~0, below the threshold.
    hit = loaded.identify(embedder, read_image(image_path("Colin_Powell", 1)), top_k=3)
    assert hit.decision == "Colin_Powell" and hit.matches[0].distance < 1e-4 and len(hit.matches) == 3
    assert [m.rank for m in hit.matches] == [1, 2, 3]
    assert all(a.distance <= b.distance for a, b in zip(hit.matches, hit.matches[1:]))
    # Someone not enrolled is "unknown" under this strict threshold, though an identity still ranks first.
    miss = loaded.identify(embedder, read_image(image_path("Abel_Pacheco", 1)), top_k=5)
    assert miss.decision == UNKNOWN and len(miss.matches) == 5 and not any(m.match for m in miss.matches)
    assert miss.threshold == 0.01 and miss.calibrated_at == "112" and miss.threshold_source == "model"


def test_calibrated_threshold_is_verifications_best_threshold_on_leave_one_out_scores(embedder, tmp_path):
    from crfr.evaluation.verification import best_threshold

    people = people_with(3, 12)
    source = identity_folder(tmp_path / "enrol", people, numbers=(1, 2, 3))
    cfg = GalleryCfg(min_calibration_pairs=10, calibration_probes=500)
    g, _ = build(source, embedder, cfg, RESOLUTIONS)
    assert g.count == 36 and g.thresholds["112"]["source"] == "gallery"
    assert g.thresholds["112"]["genuine"] == 36 and g.thresholds["112"]["impostor"] == 36
    # The same scores computed independently: each face against all others, its own row left out.
    emb = g.embeddings.astype(np.float64)
    dist = np.sum((emb[:, None] - emb[None]) ** 2, axis=2)
    np.fill_diagonal(dist, np.inf)
    same = np.array(g.identities)[:, None] == np.array(g.identities)[None]
    genuine = np.where(same, dist, np.inf).min(1)
    impostor = np.where(same, np.inf, dist).min(1)
    expected = best_threshold(np.concatenate([genuine, impostor]), np.r_[np.ones(36, bool), np.zeros(36, bool)])
    assert g.thresholds["112"]["value"] == pytest.approx(expected, abs=1e-6)
    assert g.thresholds["14"]["source"] == "gallery"  # LR probes of the same faces, calibrated on their own


def test_csv_source_add_and_model_check(embedder, model_dir, tmp_path):
    csv_file = tmp_path / "list" / "enrol.csv"
    csv_file.parent.mkdir()
    shutil.copy(image_path("Tony_Blair", 1), csv_file.parent / "tb1.jpg")
    csv_file.write_text(f"path,identity\ntb1.jpg,Tony_Blair\n{image_path('Colin_Powell', 1)},Colin_Powell\n"
                        f"missing.jpg,Nobody\n")
    assert list_source(csv_file)[0] == ("Tony_Blair", str(csv_file.parent / "tb1.jpg"))
    g, skipped = build(csv_file, embedder, GalleryCfg(), RESOLUTIONS)
    assert g.count == 2 and len(skipped) == 1 and "missing.jpg" in skipped[0]
    g.save(tmp_path / "g")

    more = identity_folder(tmp_path / "more", ["Hugo_Chavez", "Serena_Williams"], numbers=(1, 2))
    bigger, added, _ = add(Gallery.load(tmp_path / "g"), more, embedder, GalleryCfg(), RESOLUTIONS)
    assert added == 4 and bigger.count == 6 and bigger.index.ntotal == 6
    assert [e["faces"] for e in bigger.manifest["enrolled"]] == [2, 4]
    again, added_again, notes = add(bigger, more, embedder, GalleryCfg(), RESOLUTIONS)
    assert added_again == 0 and again.count == 6 and "already enrolled" in notes[0]

    other = FaceEmbedder.from_dir(save_random_model(tmp_path / "other", seed=12, backbone="waveresnet"))
    with pytest.raises(GalleryError, match="was built with .* another one"):
        bigger.check_model(other, "the other model")
    with pytest.raises(GalleryError, match="was built with"):
        add(bigger, more, other, GalleryCfg(), RESOLUTIONS)

    bad = tmp_path / "bad.csv"
    bad.write_text("a.jpg,Someone,extra\n")
    with pytest.raises(Exception, match="line 1: expected 'path,identity'"):
        list_source(bad)


def test_approximate_index_past_exact_max_and_its_recall(embedder, tmp_path):
    people = people_with(4, 30)
    source = identity_folder(tmp_path / "enrol", people, numbers=(1, 2, 3, 4))
    cfg = GalleryCfg(exact_max=50, approximate="ivf", ivf_nprobe=1, recall_k=5)
    g, _ = build(source, embedder, cfg, RESOLUTIONS)
    index = g.manifest["index"]
    assert g.count == 120 and index["kind"] == "ivf" and not index["exact"] and index["nlist"] == 3
    assert index["recall"]["k"] == 5 and index["recall"]["queries"] == 120 and 0 < index["recall"]["recall"] <= 1
    # Visiting 1 of 3 cells fell short of target_recall: the search was widened until it reached it.
    assert index["nprobe"] > 1 and (index["recall"]["recall"] >= cfg.target_recall or index["nprobe"] == 3)
    g.save(tmp_path / "g")
    assert Gallery.load(tmp_path / "g").index.nprobe == index["nprobe"]

    # recall measures something: one cell of 200 over unstructured vectors misses neighbours, all 200 none.
    x = np.random.default_rng(0).standard_normal((10_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    narrow, _ = build_index(x, GalleryCfg(exact_max=1, ivf_nlist=200, ivf_nprobe=1))
    wide, _ = build_index(x, GalleryCfg(exact_max=1, ivf_nlist=200, ivf_nprobe=200))
    assert measure_recall(narrow, x, 10, 300)["recall"] < 0.9
    assert measure_recall(wide, x, 10, 300)["recall"] == pytest.approx(1.0)
    hnsw, info = build_index(x, GalleryCfg(exact_max=1, approximate="hnsw"))
    assert info["kind"] == "hnsw" and measure_recall(hnsw, x, 10, 300)["recall"] > 0.9


def test_s3_source_and_gallery(embedder, s3_server, tmp_path):
    import boto3

    from crfr import storage

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="faces")
    storage.upload(identity_folder(tmp_path / "enrol", FIVE[:3]), "s3://faces/enrol")
    g, _ = build("s3://faces/enrol", embedder, GalleryCfg(), RESOLUTIONS)
    g.save("s3://faces/galleries/main")
    assert is_gallery("s3://faces/galleries/main")
    loaded = Gallery.load("s3://faces/galleries/main")
    assert loaded.count == 3
    assert loaded.identify(embedder, read_image(image_path("Tony_Blair", 1)), 1).decision == "Tony_Blair"


def test_cli_build_identify_info_and_errors(model_dir, tmp_path, capsys):
    params = str(params_file(tmp_path))
    source = identity_folder(tmp_path / "enrol", FIVE)
    out = tmp_path / "index"
    assert main(["gallery", "build", str(source), "--out", str(out), "--model", str(model_dir),
                 "--params", params]) == 0
    assert "5 faces of 5 identities, flat index" in capsys.readouterr().out
    probe = str(image_path("Colin_Powell", 1))
    assert main(["identify", probe, "--gallery", str(out), "--model", str(model_dir), "--params", params]) == 0
    printed = capsys.readouterr().out
    assert "decision: Colin_Powell" in printed and "   1  Colin_Powell" in printed
    assert main(["gallery", "info", str(out)]) == 0 and str(model_dir) in capsys.readouterr().out
    # A plain folder of images is enrolled in memory and searched the same way.
    assert main(["identify", probe, "--gallery", str(source), "--model", str(model_dir), "--params", params]) == 0
    assert "Colin_Powell" in capsys.readouterr().out

    other = save_random_model(tmp_path / "other", seed=13, backbone="waveresnet")
    for argv, needle in [
        (["identify", probe, "--gallery", str(out), "--model", str(other), "--params", params], "was built with"),
        (["gallery", "build", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"), "--model", str(model_dir),
          "--params", params], "nothing"),
        (["gallery", "info", str(source)], "is not a crfr gallery"),
    ]:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("crfr: error:") and needle in err and "Traceback" not in err, argv


def test_bench_gallery_reports_latency_and_recall():
    from crfr.bench.gallery import run_gallery_bench

    result = run_gallery_bench(GalleryCfg(), sizes=(3000,), dim=32, queries=20, max_seconds=10)
    row = result["sizes"]["3000"]
    for key in ("exact_p50_ms", "exact_p99_ms", "approx_p50_ms", "approx_batch_queries_per_s", "rss_mb"):
        assert row[key] > 0, key
    assert 0 < row["approx_recall_at_k"] <= 1 and 0 < row["approx_recall_at_1"] <= 1
    assert row["exact_timed_queries"] == 20 and row["approx_nlist"] == 55
