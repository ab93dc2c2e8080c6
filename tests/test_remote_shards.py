"""Training shards read where they lie (moto's S3 server on 127.0.0.1): a step mirrors the small part of a
prepared folder, and each shard is downloaded when first read, once, whatever the number of readers."""

from __future__ import annotations

import json
import threading

import boto3
import numpy as np
import pytest

from crfr import storage
from crfr.data.remote_shards import LOCATION, local_prepared, move_shards, shards_location
from crfr.data.shards import ShardDataset, ShardWriter
from crfr.errors import ConfigError, DataError
from crfr.storage import traffic

IMAGES, SHARD, SIZE = 10, 4, 8  # three shards: 4 + 4 + 2


@pytest.fixture()
def prepared(tmp_path, s3_server, monkeypatch):
    """A prepared-like folder (train/ shards, a manifest, an eval file) on disk and at s3://prep/p."""
    monkeypatch.setenv("CRFR_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "prepared"
    writer = ShardWriter(root / "train", SHARD, SIZE)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    writer.add_batch(images, [i % 3 for i in range(IMAGES)])
    writer.close(classes=["a", "b", "c"])
    (root / "manifest.csv").write_text("train,eval,sha256\n")
    (root / "eval").mkdir()
    (root / "eval" / "meta.json").write_text("{}")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="prep")
    storage.upload(root, "s3://prep/p")
    return root, images


def _cached_shards(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").rglob("shard-*.npy"))


def test_a_prepared_folder_on_s3_is_mirrored_without_its_shards_which_are_read_one_by_one(prepared, tmp_path):
    root, images = prepared
    local = local_prepared("s3://prep/p")
    assert (local / "train" / "index.json").is_file() and (local / "eval" / "meta.json").is_file()
    assert _cached_shards(tmp_path) == []  # nothing of the shards before the dataset reads

    faces = ShardDataset(local / "train", shards_location(local, "s3://prep/p"))
    assert len(faces) == IMAGES and faces.classes == ["a", "b", "c"]
    before = traffic.totals()["bytes_read"]
    image, label = faces[5]  # in the second shard
    assert np.array_equal(image, images[5]) and label == 5 % 3
    assert _cached_shards(tmp_path) == ["shard-00001.npy"]
    shard_bytes = (root / "train" / "shard-00001.npy").stat().st_size
    assert traffic.totals()["bytes_read"] - before == shard_bytes
    assert np.array_equal(faces.images(range(IMAGES)), images)
    assert _cached_shards(tmp_path) == ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]


def test_loader_processes_asking_for_the_same_shard_download_it_once(prepared):
    root, images = prepared
    local = local_prepared("s3://prep/p")
    readers = [ShardDataset(local / "train", "s3://prep/p/train") for _ in range(4)]  # as four workers hold
    before = traffic.totals()["get_requests"]
    got = [None] * len(readers)

    def read(n):
        got[n] = readers[n][0][0]

    threads = [threading.Thread(target=read, args=(n,)) for n in range(len(readers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(g, images[0]) for g in got)
    assert traffic.totals()["get_requests"] - before == 1


def test_a_missing_shard_is_named_before_training_starts(prepared, tmp_path):
    storage.client().delete_object(Bucket="prep", Key="p/train/shard-00002.npy")
    local = local_prepared("s3://prep/p")
    with pytest.raises(DataError, match=r"s3://prep/p/train: shard shard-00002.npy listed in .* is missing"):
        ShardDataset(local / "train", shards_location(local, "s3://prep/p"))


def test_moved_shards_are_found_through_location_json_locally_and_on_s3(prepared, tmp_path):
    root, images = prepared
    # Where kfp.local keeps an artifact: a local folder.
    moved = move_shards(root, tmp_path / "shards", str(tmp_path / "shards"))
    assert moved == str(tmp_path / "shards") and not list((root / "train").glob("shard-*"))
    assert json.loads((root / "train" / LOCATION).read_text()) == {"uri": moved}
    assert np.array_equal(ShardDataset(root / "train", shards_location(root, root)).images(range(IMAGES)), images)

    # Uploaded by the task itself (kubeflow.shards_uri), under the data's fingerprint.
    again = tmp_path / "again"
    storage.download("s3://prep/p", again)
    location = move_shards(again, tmp_path / "artifact", "unused", upload_to="s3://prep/shards")
    assert location.startswith("s3://prep/shards/") and len(location.rsplit("/", 1)[1]) == 16
    assert sorted(p.name for p in (tmp_path / "artifact").iterdir()) == [LOCATION]
    faces = ShardDataset(again / "train", shards_location(again, again))
    assert np.array_equal(faces.images(range(IMAGES)), images)


def test_a_shard_place_crfr_cannot_read_is_refused_in_one_line(prepared, tmp_path):
    root, _ = prepared
    with pytest.raises(ConfigError, match="gs://b/k.*set kubeflow.shards_uri"):
        move_shards(root, tmp_path / "shards", "gs://b/k")
    assert shards_location(root, "s3://prep/p") == "s3://prep/p/train"  # nothing was moved or recorded
