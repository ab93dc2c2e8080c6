"""The prepare and synthesize steps end to end on small LFW subsets, and every kind of bad input."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from components.prepare import prepare
from components.synthesize import synthesize
from crfr.cli import main as cli_main
from crfr.config import load_params
from crfr.data.formats.lfw import LfwFolder, pair_identities, parse_pairs, select_folds
from crfr.data.formats.recordio import InsightfaceRec
from crfr.data.pairs import cap_pairs, load_pair_set
from crfr.data.shards import ShardDataset
from crfr.data.split import leak_free_split
from crfr.degrade import Degrader
from crfr.errors import DataError
from crfr.evaluation.probes import realistic_degrade
from crfr.faces.align import Aligner
from crfr.faces.images import decode_image, read_image

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
TINY_EVAL = "data.eval_sets=[{name: lfw, kind: lfw, folds: [9, 10], max_pairs: 40}]"


def params(*overrides: str):
    return load_params(PARAMS, list(overrides))


def _people(lfw_root: Path, n: int, min_images: int = 5) -> list[str]:
    """The first ``n`` people (by name) with at least ``min_images`` images (subsets write their own pairs.txt)."""
    folder = LfwFolder(lfw_root)
    names = [p.name for p in sorted(folder.images_dir.iterdir())]
    return [n_ for n_ in names if len(list((folder.images_dir / n_).glob("*.jpg"))) >= min_images][:n]


def make_lfw_subset(
    tmp: Path, lfw_root: Path, train: list[str], evals: list[str], pairs_text: str | None = None
) -> Path:
    """An LFW-style root of symlinked images: ``train`` people for training, ``evals`` people in a 1-fold
    pairs.txt (2 same-person and 2 different-person pairs)."""
    root = tmp / "lfw"
    for name in train + evals:
        (root / "lfw-deepfunneled" / name).mkdir(parents=True)
        for f in sorted((lfw_root / "lfw-deepfunneled" / name).glob("*.jpg")):
            os.symlink(f, root / "lfw-deepfunneled" / name / f.name)
    a, b = evals
    text = pairs_text or f"1\t2\n{a}\t1\t2\n{b}\t1\t3\n{a}\t1\t{b}\t2\n{a}\t3\t{b}\t1\n"
    (root / "pairs.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, lfw_root):
    """prepare + synthesize on 10 training identities and 40 eval pairs."""
    out = tmp_path_factory.mktemp("tiny")
    p = params("data.max_identities=10", TINY_EVAL)
    report = prepare(str(lfw_root), str(out / "prepared"), p, progress=False)
    index = synthesize(str(out / "prepared"), str(out / "probes"), p, progress=False)
    return out, p, report, index


def test_prepared_layout_follows_formats_md(tiny, lfw_root):
    out, p, report, _ = tiny
    prepared = out / "prepared"
    validation = ["validation"] if p.data.validation_identities else []
    expected = ["eval", "manifest.csv", "report.json", "train", *validation]
    assert sorted(x.name for x in prepared.iterdir()) == expected
    index = json.loads((prepared / "train" / "index.json").read_text())
    assert index["format"] == "crfr-shards/1" and index["num_classes"] == 10 and index["image_size"] == 112
    assert len(index["classes"]) == 10 and index["shards"][0]["file"] == "shard-00000.npy"
    shard = np.load(prepared / "train" / "shard-00000.npy", mmap_mode="r")
    labels = np.load(prepared / "train" / "labels.npy")
    assert shard.dtype == np.uint8 and shard.shape[1:] == (112, 112, 3) and labels.dtype == np.int64
    ds = ShardDataset(prepared / "train")
    assert len(ds) == index["num_images"] == report["train"]["images"] and ds.num_classes == 10
    assert np.bincount(ds.labels).min() >= p.data.min_images_per_identity
    assert np.bincount(ds.labels).max() <= p.data.max_images_per_identity
    # Stored pixels are the aligned source image, RGB.
    rows = list(csv.DictReader(open(prepared / "manifest.csv")))
    first_train = next(r for r in rows if r["split"] == "train")
    assert first_train["path"].startswith("lfw-deepfunneled/")  # relative to the LFW root
    want = Aligner(p.data)([read_image(lfw_root / first_train["path"])])[0]
    # MTCNN on a batch of photos (prepare) and on one photo can differ in the last bits of a landmark.
    assert np.abs(ds[0][0].astype(int) - want).max() <= (0 if p.data.align == "center-crop" else 8)
    assert np.abs(ds[0][0].astype(int) - want).mean() < 1.0 and ds.classes[ds[0][1]] == first_train["identity"]
    ps = load_pair_set(prepared / "eval" / "lfw")
    assert ps.num_pairs == 40 and ps.same.sum() == 20 and set(ps.fold.tolist()) == {9, 10}
    assert ps.images.shape == (len(ps.images), 112, 112, 3) and ps.meta["kind"] == "lfw"
    validation = len(load_pair_set(prepared / "validation").images) if p.data.validation_identities else 0
    assert {r["split"] for r in rows} == {"train", "eval:lfw"} | ({"validation"} if validation else set())
    assert len(rows) == len(ds) + len(ps.images) + validation
    assert all(len(r["sha256"]) == 64 for r in rows)
    rep = json.loads((prepared / "report.json").read_text())
    assert rep["train"]["images_per_identity"]["identities"] == 10
    assert rep["train"]["dropped"]["identities_in_eval_pairs"] == rep["identities_excluded_from_training"] > 0
    assert rep["train"]["align"]["fallbacks"] == 0 and "total" in rep["timings_s"]


def test_training_and_evaluation_identities_never_overlap(tiny, lfw_root):
    out, *_ = tiny
    evaluated = pair_identities(select_folds(parse_pairs(lfw_root / "pairs.txt"), [9, 10]))
    trained = set(ShardDataset(out / "prepared" / "train").classes)
    assert trained and not trained & evaluated
    rows = list(csv.DictReader(open(out / "prepared" / "manifest.csv")))
    assert not {r["identity"] for r in rows if r["split"] == "train"} & evaluated


def test_demo_split_is_leak_free_and_has_the_documented_size(lfw_root):
    """The params.yaml demo split over all of LFW (no decoding): 493 people, 4,386 images after the cap."""
    p = params()
    folder = LfwFolder(lfw_root)
    evaluated = pair_identities(select_folds(folder.pairs(), [9, 10]))
    split = leak_free_split(folder.identities(), evaluated, 4, 30, None, p.seed)
    assert len(split.identities) == 493 and split.num_images == 4386
    assert not set(split.identities) & evaluated
    again = leak_free_split(folder.identities(), evaluated, 4, 30, None, p.seed)
    assert again.images == split.images  # the per-person cap is deterministic


def test_cap_pairs_is_balanced():
    same = np.array([True] * 6 + [False] * 6 + [True] * 6 + [False] * 6)
    fold = np.repeat([1, 2], 12)
    keep = cap_pairs(same, fold, 8)
    assert len(keep) == 8 and same[keep].sum() == 4 and (fold[keep] == 1).sum() == 4
    assert list(keep) == sorted(keep) and len(cap_pairs(same, fold, None)) == 24


def test_probes_follow_the_protocols(tiny):
    out, p, _, index = tiny
    probes = out / "probes"
    assert index["sizes"] == [14, 28, 56] and index["protocols"] == ["linear", "realistic", "unaligned"]
    for size in (14, 28, 56, 112):  # a 112 px wide loose crop too: it is not the aligned HR face
        heights = np.load(probes / "lfw" / "unaligned" / f"{size}.heights.npy")
        crops = np.load(probes / "lfw" / "unaligned" / f"{size}.npy")
        assert crops.shape[2] == size and crops.shape[1] == heights.max() and (heights > size).all()
    assert json.loads((probes / "index.json").read_text())["seed"] == p.evaluate.realistic_seed
    assert (probes / "preview.png").stat().st_size > 10_000
    ps = load_pair_set(out / "prepared" / "eval" / "lfw")
    # The realistic protocol corrupts with its own settings, not training's (else it favours the rows trained
    # on exactly that corruption).
    assert p.evaluate.realistic.p_poisson != p.degrade.p_poisson
    degrader = Degrader(realistic_degrade(p), seed=p.evaluate.realistic_seed)
    for size in (14, 28, 56):
        lin = np.load(probes / "lfw" / "linear" / f"{size}.npy")
        real = np.load(probes / "lfw" / "realistic" / f"{size}.npy")
        assert lin.shape == real.shape == (len(ps.images), size, size, 3) and lin.dtype == np.uint8
        for row in (0, len(ps.images) - 1):
            img = np.asarray(ps.images[row])
            assert np.array_equal(lin[row], cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR))
            assert np.array_equal(real[row], degrader.apply_lr(img, index=row, size=size)[0])


def test_cli_prepare_and_synthesize(tmp_path, lfw_root, capsys):
    sets = ["--set", "data.max_identities=3",
            "--set", "data.eval_sets=[{name: lfw, kind: lfw, folds: [10], max_pairs: 8}]",
            "--set", "evaluate.resolutions=[14, 112]", "--set", "evaluate.protocols=[linear]"]
    assert cli_main(["data", "prepare", "--params", str(PARAMS), *sets, "--source", str(lfw_root),
                     "--out", str(tmp_path / "prep"), "--no-progress"]) == 0
    assert cli_main(["data", "synthesize", "--params", str(PARAMS), *sets, "--prepared", str(tmp_path / "prep"),
                     "--out", str(tmp_path / "probes"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "probes" / "lfw" / "linear").iterdir()) == ["14.npy"]
    assert "train: 3 identities" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------- other sources


def test_recordio_training_and_bin_and_csv_eval_sets(tmp_path, lfw_root):
    """LFW exported to train.rec and lfw.bin (lossless PNG), then prepared back: identical pixels and labels."""
    from crfr.data.export import export_bin, export_rec

    base = params("data.max_identities=3", "data.max_images_per_identity=4",
                  "data.eval_sets=[{name: lfw, kind: lfw, folds: [10]}]")
    rec = export_rec(base, tmp_path / "rec", str(lfw_root), encoding="png", progress=False)
    export_bin(base, tmp_path / "lfw.bin", str(lfw_root), folds=[10], max_pairs=10, encoding="png", progress=False)
    people = ["Abdullah_Gul", "Adrien_Brody"]
    rows = [(f"{people[0]}/{people[0]}_0001.jpg", f"{people[0]}/{people[0]}_0002.jpg", 1),
            (f"{people[0]}/{people[0]}_0003.jpg", f"{people[1]}/{people[1]}_0001.jpg", 0)]
    with open(tmp_path / "pairs.csv", "w") as f:
        f.write("path1,path2,same\n" + "".join(f"{a},{b},{s}\n" for a, b, s in rows))
    sets = (f"data.eval_sets=[{{name: lfwbin, kind: bin, path: {tmp_path / 'lfw.bin'}}}, "
            f"{{name: mine, kind: csv, path: {tmp_path / 'pairs.csv'}, image_root: {lfw_root / 'lfw-deepfunneled'}}}]")
    p = params("data.train=recordio", f"data.train_rec={tmp_path / 'rec' / 'train.rec'}", "data.align=none", sets,
               "data.validation_identities=0")
    report = prepare(None, str(tmp_path / "prep"), p, progress=False)
    ds = ShardDataset(tmp_path / "prep" / "train")
    assert len(ds) == rec["images"] == 12 and ds.classes == ["0", "1", "2"]
    with InsightfaceRec(tmp_path / "rec" / "train.rec") as r:
        for i, (_key, label, blob) in enumerate(r.iter_images()):
            img, lab = ds[i]
            assert lab == label and np.array_equal(img, decode_image(blob, "rec"))
    assert report["train"]["kind"] == "recordio" and report["train"]["align"]["resized"] == 0
    binset = load_pair_set(tmp_path / "prep" / "eval" / "lfwbin")
    assert binset.num_pairs == 10 and binset.kind == "bin" and binset.meta["align"] == "none"
    folder, aligner = LfwFolder(lfw_root), Aligner(base.data)
    fold10 = [x for x in parse_pairs(lfw_root / "pairs.txt") if x.fold == 10]
    first_same = next(x for x in fold10 if x.same)
    assert np.array_equal(binset.images[binset.left[0]], aligner([read_image(folder.path(first_same.left))])[0])
    mine = load_pair_set(tmp_path / "prep" / "eval" / "mine")
    assert mine.same.tolist() == [True, False] and len(mine.images) == 4
    assert mine.left.tolist() == [0, 2] and mine.right.tolist() == [1, 3]
    assert report["eval"]["mine"]["identities_excluded_from_training"] == 2


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_root_fails_cleanly(tmp_path, capsys):
    p = params("data.download=false")
    with pytest.raises(DataError, match=r"LFW root .*nowhere does not exist"):
        prepare(str(tmp_path / "nowhere"), str(tmp_path / "out"), p, progress=False)
    assert not (tmp_path / "out").exists()
    code = cli_main(["data", "prepare", "--params", str(PARAMS), "--set", "data.download=false",
                     "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("crfr: error: LFW root") and "Traceback" not in err


def test_pairs_line_naming_a_missing_image_fails_with_line_and_path(tmp_path, lfw_root):
    train, evals = _people(lfw_root, 4), _people(lfw_root, 6)[4:]
    text = f"1\t2\n{evals[0]}\t1\t2\n{evals[1]}\t1\t3\n{evals[0]}\t1\t{evals[1]}\t2\n{evals[0]}\t1\tNo_Body\t7\n"
    root = make_lfw_subset(tmp_path, lfw_root, train, evals, text)
    p = params("data.eval_sets=[{name: lfw, kind: lfw}]")
    with pytest.raises(DataError, match=r"pairs.txt, line 5: image .*No_Body/No_Body_0007.jpg does not exist"):
        prepare(str(root), str(tmp_path / "out"), p, progress=False)


def test_corrupt_and_empty_training_data_are_counted_or_refused(tmp_path, lfw_root):
    names = _people(lfw_root, 6)
    train, evals = names[:4], names[4:]
    root = make_lfw_subset(tmp_path, lfw_root, train, evals)
    images = root / "lfw-deepfunneled"
    (images / "Empty_Person").mkdir()
    (images / train[0] / f"{train[0]}_9999.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    # The second person keeps exactly 5 files, 2 of them broken: too few readable images are left.
    person = images / train[1]
    for f in sorted(person.iterdir())[5:]:
        f.unlink()
    for f in sorted(person.iterdir())[:2]:
        f.unlink()
        f.write_bytes(b"garbage")
    sets = "data.eval_sets=[{name: lfw, kind: lfw}]"
    # The subset has no person with 2-3 images to validate on.
    report = prepare(str(root), str(tmp_path / "ok"), params(sets, "data.max_bad_fraction=0.2",
                                                             "data.validation_identities=0",
                                                             "data.min_images_per_identity=4"), progress=False)
    t = report["train"]
    assert t["bad_images"]["unreadable"] == 3
    assert f"{train[0]}_9999.jpg" in " ".join(t["bad_images"]["unreadable_files"])
    assert t["dropped"]["identities_empty"] == 1 and t["dropped"]["identities_below_min_after_unreadable"] == 1
    assert t["dropped"]["identities_in_eval_pairs"] == 2 and t["identities"] == 3
    assert train[1] not in ShardDataset(tmp_path / "ok" / "train").classes
    refused = rf"3 of \d+ images are unreadable, more than data.max_bad_fraction=0.01: .*{train[0]}_9999.jpg"
    with pytest.raises(DataError, match=refused):
        prepare(str(root), str(tmp_path / "bad"), params(sets, "data.validation_identities=0"), progress=False)
    assert not (tmp_path / "bad").exists()  # nothing half-written


def test_truncated_rec_and_malicious_bin_fail_without_a_traceback(tmp_path, lfw_root, capsys):
    from crfr.data.export import export_rec

    base = params("data.max_identities=2", "data.max_images_per_identity=4")
    export_rec(base, tmp_path / "rec", str(lfw_root), progress=False)
    rec = tmp_path / "rec" / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-100])
    p = params("data.train=recordio", f"data.train_rec={rec}", "data.align=none", "data.validation_identities=0",
               "data.eval_sets=[{name: lfw, kind: lfw, folds: [10], max_pairs: 4}]")
    with pytest.raises(DataError, match=r"train.rec: truncated record at offset \d+"):
        prepare(str(lfw_root), str(tmp_path / "out"), p, progress=False)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([Evil(), b""], [True]), protocol=2))
    code = cli_main(["data", "prepare", "--params", str(PARAMS), "--source", str(lfw_root),
                     "--set", f"data.eval_sets=[{{name: x, kind: bin, path: {evil}}}]", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "evil.bin: refused to load: the pickle calls posix.system" in err
    assert not marker.exists() and "Traceback" not in err


@pytest.mark.slow
def test_demo_prepare_over_all_of_lfw_and_cfp(tmp_path, lfw_root):
    """The params.yaml demo: LFW training without any evaluated person, LFW folds 9-10 and CFP FF/FP capped,
    the validation split. (Its speed is a benchmark's business: ``crfr bench data``.)"""
    report = prepare(str(lfw_root), str(tmp_path / "prepared"), params(f"storage.cache_dir={tmp_path / 'cache'}"),
                     progress=False)
    # 493 people with >= 4 images outside folds 9-10; the 74 of them who are also CFP people are left out.
    assert report["train"]["identities"] == 419 and report["train"]["images"] == 3358
    assert report["eval"]["lfw"]["pairs"] == 1200 and report["eval"]["lfw"]["folds"] == [9, 10]
    for name in ("cfp_ff", "cfp_fp"):
        entry = report["eval"][name]
        assert entry["pairs"] == 600 and entry["same_pairs"] == 300 and entry["folds"] == list(range(1, 11))
        assert entry["align"]["mode"] == "detect" and entry["align"]["detected"] >= 0.95 * entry["align"]["aligned"]
    assert report["validation"]["pairs"] == 600 and report["validation"]["identities"] == 200
    assert report["train"]["bad_images"]["unreadable"] == 0
    cfp_people = {"_".join(line.split()) for line in (lfw_root.parent / "cfp" / "Data" / "list_name.txt")
                  .read_text().splitlines() if line.strip()}
    classes = set(json.loads((tmp_path / "prepared" / "train" / "index.json").read_text())["classes"])
    assert not classes & cfp_people


def test_unlabelled_people_are_those_below_the_minimum_outside_every_held_out_set(lfw_root):
    """data.unlabelled over all of LFW (no decoding): the people with 1-3 images outside the evaluated pairs
    and the validation people, apart from the labelled split, which stays as it was."""
    folder = LfwFolder(lfw_root)
    people = folder.identities()
    evaluated = pair_identities(select_folds(folder.pairs(), [9, 10]))
    held = {n for n in sorted(people) if len(people[n]) in (2, 3) and n not in evaluated}
    held = set(sorted(held)[:50])
    split = leak_free_split(people, evaluated, 4, 30, None, 0, held, unlabelled=True)
    below = {n for n, paths in people.items() if 1 <= len(paths) < 4} - evaluated - held
    assert set(split.unlabelled) == below and len(below) > 3000
    assert all(split.unlabelled[n] == people[n] for n in below)
    labelled = leak_free_split(people, evaluated, 4, 30, None, 0, held)
    assert labelled.identities == split.identities and labelled.images == split.images and not labelled.unlabelled
    capped = leak_free_split(people, evaluated, 4, 30, 5, 0, held, unlabelled=True)
    assert len(capped.identities) == 5 and list(capped.unlabelled) == sorted(below)[:5]


def test_prepare_writes_unlabelled_faces_after_the_labelled_ones(tmp_path, lfw_root):
    train = _people(lfw_root, 3)
    evals = _people(lfw_root, 5)[3:]
    few = [n for n in _people(lfw_root, 60, min_images=1) if len(list((lfw_root / "lfw-deepfunneled" / n)
                                                                   .glob("*.jpg"))) < 4][:2]
    root = make_lfw_subset(tmp_path, lfw_root, train + few, evals)
    p = params("data.eval_sets=[{name: lfw, kind: lfw}]", "data.validation_identities=0", "data.align=center-crop",
               "data.unlabelled=true", "teacher.source=onnx", "teacher.onnx=teacher.onnx")
    report = prepare(str(root), str(tmp_path / "out"), p, progress=False)
    ds = ShardDataset(tmp_path / "out" / "train")
    unlabelled = sum(len(list((root / "lfw-deepfunneled" / n).glob("*.jpg"))) for n in few)
    assert ds.num_classes == 3 and ds.classes == train
    assert report["train"]["unlabelled"] == {"identities": 2, "images": unlabelled}
    assert list(ds.labels[-unlabelled:]) == [-1] * unlabelled and (ds.labels[:-unlabelled] >= 0).all()
    assert ds.index["unlabelled_images"] == unlabelled
    with pytest.raises(Exception, match="data.unlabelled: true needs teacher.source: onnx or dlib"):
        params("data.unlabelled=true")
