"""Every command-line input that names face data takes an s3:// URI: check, prepare's --source, export's
--source and --out, against moto's S3 server on 127.0.0.1 with real LFW faces."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pytest

from crfr import storage
from crfr.cli import main as cli_main
from crfr.data.export import export_bin, export_rec
from crfr.data.formats.binset import read_bin
from crfr.data.pairs import load_pair_set
from crfr.data.shards import ShardDataset
from tests.test_data_prepare import PARAMS, _people, make_lfw_subset, params


@pytest.fixture()
def lfw_s3(s3_server, tmp_path, lfw_root, monkeypatch):
    """A small LFW root, on disk and uploaded to ``s3://faces/lfw``; s3:// inputs are mirrored under tmp_path."""
    monkeypatch.setenv("CRFR_CACHE_DIR", str(tmp_path / "cache"))
    names = _people(lfw_root, 6)
    root = make_lfw_subset(tmp_path, lfw_root, names[:4], names[4:])
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="faces")
    storage.upload(root, "s3://faces/lfw")
    return root


def test_data_check_reads_an_s3_lfw_root(lfw_s3, capsys):
    assert cli_main(["data", "check", str(lfw_s3), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert cli_main(["data", "check", "s3://faces/lfw", "--json"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["source"] == "s3://faces/lfw" and remote["ok"] and remote["kind"] == "lfw"
    for key in ("identities", "images", "view2_pairs", "view2_identities", "images_decoded"):
        assert remote["counts"][key] == local["counts"][key], key
    assert remote["counts"]["identities"] == 6 and remote["counts"]["view2_pairs"] == 4

    assert cli_main(["data", "check", "s3://faces/nobody"]) == 1
    out = capsys.readouterr().out
    assert "NOT usable" in out and "problem: s3://faces/nobody: no object or folder" in out


def test_prepare_from_an_s3_source_equals_the_local_one(lfw_s3, tmp_path, capsys):
    # The 6-person subset has no one with 2-3 images to validate on.
    sets = ["--set", "data.eval_sets=[{name: lfw, kind: lfw}]", "--set", "data.validation_identities=0"]
    for name, source in (("local", str(lfw_s3)), ("s3", "s3://faces/lfw")):
        assert cli_main(["data", "prepare", "--params", str(PARAMS), *sets, "--source", source,
                         "--out", str(tmp_path / name), "--no-progress"]) == 0
    assert "train: 4 identities" in capsys.readouterr().out
    a, b = ShardDataset(tmp_path / "local" / "train"), ShardDataset(tmp_path / "s3" / "train")
    assert a.classes == b.classes and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.images(range(len(a))), b.images(range(len(b))))
    ea, eb = load_pair_set(tmp_path / "local" / "eval" / "lfw"), load_pair_set(tmp_path / "s3" / "eval" / "lfw")
    assert np.array_equal(ea.images, eb.images) and ea.num_pairs == eb.num_pairs == 4
    # Paths relative to the source root: the same manifest whichever copy was read.
    assert (tmp_path / "local" / "manifest.csv").read_text() == (tmp_path / "s3" / "manifest.csv").read_text()


def test_export_reads_and_writes_s3_and_the_result_checks(lfw_s3, tmp_path, capsys):
    p = params("data.eval_sets=[{name: lfw, kind: lfw}]")
    local = export_bin(p, tmp_path / "lfw.bin", str(lfw_s3), progress=False)
    remote = export_bin(p, "s3://faces/out/lfw.bin", "s3://faces/lfw", progress=False)
    assert remote == {**local, "path": "s3://faces/out/lfw.bin"}
    assert storage.read_bytes("s3://faces/out/lfw.bin") == (tmp_path / "lfw.bin").read_bytes()
    assert read_bin(tmp_path / "lfw.bin").num_pairs == 4

    rec = export_rec(p, "s3://faces/out/rec", "s3://faces/lfw", encoding="png", progress=False)
    assert rec["path"] == "s3://faces/out/rec/train.rec" and rec["classes"] == 4
    assert storage.exists("s3://faces/out/rec/train.idx")
    assert cli_main(["data", "check", "s3://faces/out/rec/train.rec", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "rec" and report["counts"]["images"] == rec["images"]
    assert report["counts"]["index_entries"] == rec["images"] + rec["classes"] + 1  # header + identity records
    assert cli_main(["data", "check", "s3://faces/out/lfw.bin"]) == 0
