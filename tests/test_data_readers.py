"""Readers and writers of every data format, by round trip; the restricted unpickler against a hostile .bin.

"Same pixels" below means: for PNG-encoded exports, bit-identical uint8 arrays to the aligned source; for
JPEG-encoded exports, the stored bytes are exactly those that were encoded, they decode to exactly the array
that decoding them did at write time, and they are within JPEG error (mean |diff| < 3 grey levels) of the
aligned source.
"""

from __future__ import annotations

import os
import pickle
import struct
import time

import numpy as np
import pytest

from crfr.cli import main as cli_main
from crfr.config import load_params
from crfr.data.formats.binset import read_bin, safe_loads, write_bin
from crfr.data.formats.lfw import LfwFolder, parse_pairs, select_folds
from crfr.data.formats.pairs_csv import check_images_exist, read_pairs_csv, write_pairs_csv
from crfr.data.formats.recordio import MAGIC, Header, InsightfaceRec, RecordReader, RecordWriter, pack, unpack
from crfr.data.pairs import contiguous_folds, load_pair_set, write_pair_set
from crfr.data.shards import ShardDataset, ShardWriter
from crfr.errors import DataError
from crfr.faces.align import Aligner
from crfr.faces.images import decode_image, encode_image, read_image

# --------------------------------------------------------------------------------------------- LFW pairs


def test_view2_pairs_parse_into_ten_disjoint_folds(lfw_root):
    pairs = parse_pairs(lfw_root / "pairs.txt")
    assert len(pairs) == 6000
    assert sorted({p.fold for p in pairs}) == list(range(1, 11))
    fold1 = [p for p in pairs if p.fold == 1]
    assert [p.same for p in fold1] == [True] * 300 + [False] * 300
    assert fold1[0].line == 2 and fold1[0].left.name == fold1[0].right.name
    names = [{r.name for p in pairs if p.fold == f for r in (p.left, p.right)} for f in range(1, 11)]
    for i in range(10):
        for j in range(i + 1, 10):
            assert not names[i] & names[j], f"folds {i + 1} and {j + 1} share people"
    LfwFolder(lfw_root).check_pairs_exist(select_folds(pairs, [9, 10]))


def test_view1_pairs_parse(lfw_root):
    train, test = parse_pairs(lfw_root / "pairsDevTrain.txt"), parse_pairs(lfw_root / "pairsDevTest.txt")
    assert len(train) == 2200 and len(test) == 1000
    assert sum(p.same for p in train) == 1100 and {p.fold for p in train} == {1}
    ids = lambda ps: {r.name for p in ps for r in (p.left, p.right)}  # noqa: E731
    assert not ids(train) & ids(test)


@pytest.mark.parametrize(
    "text, message",
    [
        ("1\t1\nA\t1\t2\nA\t1\tB\n", "line 3: a different-person line"),
        ("1\t1\nA\t1\nA\t1\tB\t2\n", "line 2: a same-person line"),
        ("1\t2\nA\t1\t2\n", "header promises 4 pair lines"),
        ("x\n", "line 1: pair count must be an integer"),
        ("1\t1\nA\t1\t2\nA\t1\tB\t2\nC\t1\t2\n", "line 4: extra line"),
        ("", "is empty"),
        ("1\t1\nA\tone\t2\nA\t1\tB\t2\n", "line 2: image number must be an integer"),
    ],
)
def test_malformed_pairs_name_the_line(tmp_path, text, message):
    f = tmp_path / "pairs.txt"
    f.write_text(text)
    with pytest.raises(DataError, match=message):
        parse_pairs(f)


def test_missing_pair_image_names_line_and_path(tmp_path, lfw_root):
    (tmp_path / "imgs" / "Aaron_Eckhart").mkdir(parents=True)
    os.symlink(lfw_root / "lfw-deepfunneled/Aaron_Eckhart/Aaron_Eckhart_0001.jpg",
               tmp_path / "imgs/Aaron_Eckhart/Aaron_Eckhart_0001.jpg")
    (tmp_path / "pairs.txt").write_text("1\t1\nAaron_Eckhart\t1\t1\nAaron_Eckhart\t1\tNobody\t3\n")
    folder = LfwFolder(tmp_path, "imgs")
    with pytest.raises(DataError, match=r"pairs.txt, line 3: image .*Nobody_0003.jpg does not exist"):
        folder.check_pairs_exist(folder.pairs())


def test_missing_lfw_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        LfwFolder(tmp_path / "nope")
    with pytest.raises(DataError, match="data.images_subdir"):
        LfwFolder(tmp_path)


# ----------------------------------------------------------------------------------------------- RecordIO


def test_recordio_round_trip_with_split_records_and_index(tmp_path):
    magic = struct.pack("<I", MAGIC)
    payloads = [
        b"",
        b"abc",  # needs padding
        magic + b"xyz" + magic + magic + b"1234",  # magic words at aligned positions: a multi-part record
        b"q" + magic + b"rs",  # unaligned magic: not split
        os.urandom(10_001),
    ]
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordWriter(rec, idx) as w:
        offsets = [w.write(p, key=k) for k, p in enumerate(payloads)]
    with RecordReader(rec) as r:
        assert [p for _, p in r] == payloads
        assert [o for o, _ in r] == offsets
        assert r.index == dict(enumerate(offsets))
        assert r.read_key(2) == payloads[2]
    raw = rec.read_bytes()
    assert raw.count(magic) == len(payloads) + 3 + 1  # one per part; the unaligned one stays inside its record
    assert rec.stat().st_size % 4 == 0


def test_record_header_pack_unpack():
    h, body = unpack(pack(Header(0, 7.0, 3, 4), b"JPEG"))
    assert (h.flag, h.label, h.id, h.id2, body) == (0, 7.0, 3, 4, b"JPEG")
    h, body = unpack(pack(Header(0, np.array([5, 1.5, 2]), 1, 0), b"img"))
    assert h.flag == 3 and h.label.tolist() == [5, 1.5, 2] and h.class_label() == 5 and body == b"img"


def test_truncated_and_corrupt_rec_name_file_and_offset(tmp_path):
    rec = tmp_path / "train.rec"
    with RecordWriter(rec) as w:
        w.write(pack(Header(2, np.array([3, 4], "<f4")), b""))
        w.write(pack(Header(0, 0.0), b"x" * 100))
        second = w.write(pack(Header(0, 1.0), b"y" * 100))
    data = rec.read_bytes()
    rec.write_bytes(data[: second + 50])
    with pytest.raises(DataError, match=rf"train.rec: truncated record at offset {second}"):
        list(InsightfaceRec(rec).iter_images())
    rec.write_bytes(data[:second])  # whole records, but fewer than the header promises
    with pytest.raises(DataError, match="truncated: the header promises image keys up to 2"):
        list(InsightfaceRec(rec).iter_images())
    rec.write_bytes(data[:second] + b"\0" * 8 + data[second + 8 :])
    with pytest.raises(DataError, match=rf"corrupt record at offset {second}: magic 0x00000000"):
        list(InsightfaceRec(rec).iter_images())
    assert cli_main(["data", "check", str(rec)]) != 0


def _subset_params(lfw_root, **over):
    # center-crop: these tests compare the exported pixels exactly with one image aligned alone, and MTCNN on a
    # batch and on one image may differ in a landmark's last bits (tests/test_align.py covers mtcnn).
    sets = ["data.eval_sets=[{name: lfw, kind: lfw, folds: [10]}]", "data.max_identities=4",
            "data.max_images_per_identity=4", f"data.root={lfw_root}", "data.align=center-crop"]
    return load_params("params.yaml", sets + [f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("encoding", ["png", "jpg"])
def test_lfw_to_rec_and_back(tmp_path, lfw_root, encoding):
    from crfr.data.export import export_rec

    params = _subset_params(lfw_root)
    out = export_rec(params, tmp_path, str(lfw_root), encoding=encoding, progress=False)
    assert out["images"] == 16 and out["classes"] == 4
    aligner = Aligner(params.data)
    folder = LfwFolder(lfw_root)
    people = folder.identities()
    with InsightfaceRec(tmp_path / "train.rec") as rec:
        assert rec.info.has_header and rec.info.num_images == 16
        assert rec.info.extra == {"identity_records": 4}
        items = list(rec.iter_images())
        # Identity records give each class's key range, as insightface's readers expect.
        for label in range(4):
            h, _ = unpack(rec.reader.read_key(17 + label))
            keys = [k for k, lab, _ in items if lab == label]
            assert h.label.tolist() == [min(keys), max(keys) + 1]
    assert [k for k, _, _ in items] == list(range(1, 17))
    labels = [lab for _, lab, _ in items]
    assert labels == sorted(labels) and set(labels) == {0, 1, 2, 3}
    for _key, label, blob in items:
        name = out["classes_list"][label]
        decoded = decode_image(blob, "rec")
        candidates = [aligner([read_image(p)])[0] for p in people[name]]
        if encoding == "png":
            assert any(np.array_equal(decoded, c) for c in candidates)
        else:
            err = min(np.abs(decoded.astype(int) - c).mean() for c in candidates)
            assert err < 3.0
            assert np.array_equal(decoded, decode_image(bytes(blob), "again"))


# ------------------------------------------------------------------------------------------------ .bin


@pytest.mark.parametrize("encoding", ["png", "jpg"])
def test_lfw_to_bin_and_back(tmp_path, lfw_root, encoding):
    from crfr.data.export import export_bin

    params = _subset_params(lfw_root)
    path = tmp_path / "lfw.bin"
    out = export_bin(params, path, str(lfw_root), folds=[10], max_pairs=12, encoding=encoding, progress=False)
    assert out == {"pairs": 12, "images": 24, "path": str(path)}
    data = read_bin(path)
    pairs = [p for p in parse_pairs(lfw_root / "pairs.txt") if p.fold == 10]
    chosen = [p for p in pairs if p.same][:6] + [p for p in pairs if not p.same][:6]
    chosen.sort(key=lambda p: p.line)
    assert data.issame.tolist() == [p.same for p in chosen]
    aligner = Aligner(params.data)
    folder = LfwFolder(lfw_root)
    for i, pair in enumerate(chosen):
        for side, ref in enumerate((pair.left, pair.right)):
            want = aligner([read_image(folder.path(ref))])[0]
            got = decode_image(data.images[2 * i + side], "bin")
            if encoding == "png":
                assert np.array_equal(got, want)
            else:
                assert np.abs(got.astype(int) - want).mean() < 3.0
                assert data.images[2 * i + side] == encode_image(want, "jpg", 95)


def test_bin_reads_python3_protocol2_and_python2_style_pickles(tmp_path):
    jpeg = encode_image(np.full((8, 8, 3), 128, np.uint8))
    # Python 3, protocol 2: bytes become _codecs.encode(str, "latin1"), b"" becomes __builtin__.bytes().
    blob = pickle.dumps(([jpeg, b"", jpeg, jpeg], [True, False]), protocol=2)
    assert b"_codecs" in blob and b"bytes" in blob
    images, issame = safe_loads(blob)
    assert images == [jpeg, b"", jpeg, jpeg] and issame == [True, False]
    # Python 2, protocol 2: str is SHORT_BINSTRING ("U"), read as bytes; no global at all.
    py2 = b"\x80\x02(U\x03abcU\x02del(\x88l\x86."
    assert safe_loads(py2) == ([b"abc", b"de"], [True])
    # Protocol 4 (what write_bin uses): bytes need no global either.
    path = tmp_path / "x.bin"
    write_bin(path, [jpeg, jpeg], [True])
    assert b"_codecs" not in path.read_bytes()
    got = read_bin(path)
    assert got.images == [jpeg, jpeg] and got.issame.tolist() == [True]


class _Payload:
    """Pickles as a call of ``func(*args)``: how a hostile .bin runs code on a plain pickle.load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_bin_is_refused_without_running_it(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Payload(os.system, f"touch {marker}")], [True]), protocol=protocol))
    with pytest.raises(DataError, match=r"evil.bin: refused to load: the pickle calls posix.system"):
        read_bin(path)
    assert not marker.exists()
    assert cli_main(["data", "check", str(path)]) != 0
    assert cli_main(["data", "check", str(path), "--json"]) != 0
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, refused",
    [
        (_Payload(eval, "1+1"), "builtins.eval"),
        (_Payload(__import__("subprocess").Popen, ["true"]), "subprocess.Popen"),
        (_Payload(__import__("codecs").encode, "x", "rot13"), "_codecs.encode is allowed only"),
        (_Payload(bytes, 10**12), "bytes(...) is allowed only without arguments"),
        (_Payload(np.zeros, 3), "numpy"),
    ],
)
def test_other_globals_and_misuse_are_refused(tmp_path, payload, refused):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(([payload, b""], [True]), protocol=4))
    with pytest.raises(DataError, match=rf"bad.bin: .*{refused.replace('(', '.').replace(')', '.')}"):
        read_bin(path)


def test_bin_structure_errors(tmp_path):
    path = tmp_path / "s.bin"
    for obj, message in [(([b"a"], [True]), "1 images for 1 pairs"), ({"a": 1}, "expected a pickled"),
                         (([b"a", "b"], [True]), "image 1 is a str"), (([b"a", b"b"], ["yes"]), "issame")]:
        path.write_bytes(pickle.dumps(obj, protocol=4))
        with pytest.raises(DataError, match=message):
            read_bin(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a readable pickle"):
        read_bin(path)


# --------------------------------------------------------------------------------------------- pairs CSV


def test_pairs_csv_round_trip_and_errors(tmp_path, lfw_root):
    rows = [("Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Aaron_Peirsol/Aaron_Peirsol_0002.jpg", True, 1),
            ("Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Abba_Eban/Abba_Eban_0001.jpg", False, 2)]
    path = tmp_path / "pairs.csv"
    write_pairs_csv(path, rows)
    got = read_pairs_csv(path)
    assert [(p.path1, p.path2, p.same, p.fold) for p in got] == rows
    assert [p.line for p in got] == [2, 3]
    check_images_exist(got, lfw_root / "lfw-deepfunneled", path)
    write_pairs_csv(path, [r[:3] for r in rows] + [("Nobody/Nobody_0001.jpg", "Abba_Eban/Abba_Eban_0001.jpg", False)])
    with pytest.raises(DataError, match=r"pairs.csv, line 4: image .*Nobody_0001.jpg does not exist"):
        check_images_exist(read_pairs_csv(path), lfw_root / "lfw-deepfunneled", path)
    for text, message in [("path1,path2\nx,y\n", "missing \\['same'\\]"),
                          ("path1,path2,same\nx,y,maybe\n", "line 2: same"),
                          ("path1,path2,same\n/etc/passwd,y,1\n", "line 2: path '/etc/passwd'"),
                          ("path1,path2,same\n../x,y,1\n", "without '..'"), ("path1,path2,same\n", "no pairs")]:
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_pairs_csv(path)


# ---------------------------------------------------------------------------------------- shards, pair sets


def test_shards_round_trip_and_speed(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, 23)
    writer = ShardWriter(tmp_path / "train", shard_size=10)
    writer.add_batch(images, labels)
    index = writer.close([f"p{i}" for i in range(5)], extra={"source": "test"})
    assert [s["count"] for s in index["shards"]] == [10, 10, 3]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "index.json", "labels.npy", "shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    ds = ShardDataset(tmp_path / "train")
    assert len(ds) == 23 and ds.num_classes == 5 and ds.classes[4] == "p4" and ds.image_size == 16
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == labels.tolist()
    for i in (0, 9, 10, 22, -1):
        img, label = ds[i]
        assert np.array_equal(img, images[i]) and label == labels[i] and img.flags.writeable
    assert np.array_equal(ds.images([3, 15, 21]), images[[3, 15, 21]])
    with pytest.raises(IndexError):
        ds[23]
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives
    assert np.array_equal(clone[12][0], images[12])
    # Reading must never be what slows training down (~30 images/s on this machine's CPUs).
    big = ShardWriter(tmp_path / "big", shard_size=512, image_size=112)
    face = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    for i in range(2000):
        big.add(face, i % 7)
    big.close()
    ds = ShardDataset(tmp_path / "big")
    order = rng.permutation(len(ds))
    start = time.perf_counter()
    for i in order:
        ds[int(i)]
    rate = len(ds) / (time.perf_counter() - start)
    assert rate > 1000, f"ShardDataset reads only {rate:.0f} images/s"


def test_incomplete_shard_folder_is_a_clear_error(tmp_path):
    writer = ShardWriter(tmp_path / "t", shard_size=4)
    writer.add(np.zeros((8, 8, 3), np.uint8), 0)
    with pytest.raises(DataError, match="no index.json"):
        ShardDataset(tmp_path / "t")
    writer.close()
    (tmp_path / "t" / "shard-00000.npy").unlink()
    with pytest.raises(DataError, match="shard-00000.npy listed in .*index.json is missing"):
        ShardDataset(tmp_path / "t")


def test_pair_set_round_trip(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    write_pair_set(tmp_path / "s", "s", images, [0, 2], [1, 3], [True, False], [1, 2], kind="csv", source="x.csv")
    ps = load_pair_set(tmp_path / "s")
    assert ps.name == "s" and ps.kind == "csv" and ps.source == "x.csv"
    assert np.array_equal(ps.images, images) and ps.left.tolist() == [0, 2] and ps.right.tolist() == [1, 3]
    assert ps.same.tolist() == [True, False] and ps.fold.tolist() == [1, 2] and ps.meta["num_pairs"] == 2
    with pytest.raises(DataError, match="pair indices outside"):
        write_pair_set(tmp_path / "t", "t", images, [0], [5], [True], [1])
    with pytest.raises(DataError, match="missing meta.json"):
        load_pair_set(tmp_path / "t2")


def test_contiguous_folds_match_kfold_blocks():
    assert contiguous_folds(6000).tolist() == np.repeat(np.arange(1, 11), 600).tolist()
    assert np.bincount(contiguous_folds(23, 10))[1:].tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]


# ------------------------------------------------------------------------------------------------- check


def test_data_check_lfw_exits_zero(lfw_root, capsys):
    assert cli_main(["data", "check", str(lfw_root), "--json", "--decode-sample", "20"]) == 0
    out = capsys.readouterr().out
    assert '"ok": true' in out and '"identities": 5749' in out and '"view2_pairs": 6000' in out


def test_data_check_flags_a_broken_lfw_copy(tmp_path, lfw_root, capsys):
    imgs = tmp_path / "lfw-deepfunneled" / "Aaron_Peirsol"
    imgs.mkdir(parents=True)
    for i in (1, 2):
        os.symlink(lfw_root / f"lfw-deepfunneled/Aaron_Peirsol/Aaron_Peirsol_000{i}.jpg",
                   imgs / f"Aaron_Peirsol_000{i}.jpg")
    (imgs / "Aaron_Peirsol_0003.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "pairs.txt").write_text("1\t1\nAaron_Peirsol\t1\t2\nAaron_Peirsol\t1\tGhost\t1\n")
    assert cli_main(["data", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "NOT usable" in out and "line 3" in out and "Aaron_Peirsol_0003.jpg" in out
