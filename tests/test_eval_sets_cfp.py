"""CFP as a prepared verification set (detect alignment, its cache, the leak exclusion by name) and CSV identities.

Real data only: CFP from ../shared/data/cfp, LFW from ../shared/data/lfw (a tiny symlinked training root).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from components.prepare import prepare
from crfr.config import DataCfg, EvalSetCfg, load_params
from crfr.data.eval_sets import read_eval_set
from crfr.data.formats.cfp import read_cfp
from crfr.data.formats.pairs_csv import pair_identity, read_pairs_csv
from crfr.data.pairs import load_pair_set
from crfr.errors import DataError
from crfr.faces.align import LFW_FUNNELED_LANDMARKS
from crfr.faces.align_cache import AlignCache, settings_for
from crfr.faces.detect import pick_face
from crfr.faces.images import read_image
from tests.test_align import needs_weights
from tests.test_cfp import CFP_ROOT

REPO = Path(__file__).resolve().parents[1]
LFW_IMAGES = Path(os.environ.get("CRFR_LFW_ROOT", "/work/shared/data/lfw")) / "lfw-deepfunneled"
# In CFP (list_name.txt) and in LFW with 4 and 5 images: trainable, were they not evaluated on CFP.
SHARED_PEOPLE = ["Adam_Sandler", "Allyson_Felix"]
LFW_ONLY = ["Aaron_Peirsol", "Abdullah_Gul", "Adrien_Brody"]
CFP_SET = "{name: cfp_fp, kind: cfp, path: %s, protocol: FP, max_pairs: 20}"


@pytest.fixture(scope="module")
def cfp_root() -> Path:
    if not (CFP_ROOT / "Protocol/Pair_list_F.txt").is_file():
        pytest.skip(f"CFP not found at {CFP_ROOT} (set CRFR_CFP_ROOT)")
    return CFP_ROOT


def _tiny_lfw(root: Path) -> Path:
    """An LFW root of symlinks: three LFW-only people and two who are also CFP people."""
    for name in LFW_ONLY + SHARED_PEOPLE:
        (root / "lfw-deepfunneled" / name).mkdir(parents=True)
        for f in sorted((LFW_IMAGES / name).glob("*.jpg"))[:6]:
            os.symlink(f, root / "lfw-deepfunneled" / name / f.name)
    (root / "pairs.txt").write_text("1\t1\n")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cfp_root, lfw_root):
    """prepare twice with one CFP FP set (20 pairs, detect alignment) and one cache folder."""
    tmp = tmp_path_factory.mktemp("cfp")
    lfw = _tiny_lfw(tmp / "lfw")
    p = load_params(REPO / "params.yaml", [f"data.eval_sets=[{CFP_SET % cfp_root}]", "data.max_images_per_identity=6",
                                          "data.validation_identities=0", f"storage.cache_dir={tmp / 'cache'}",
                                          "data.align=center-crop"])  # the placement of a center-crop model
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CRFR_CACHE_DIR", raising=False)  # it would override storage.cache_dir
        reports = [prepare(str(lfw), str(tmp / f"prep{i}"), p, progress=False) for i in (1, 2)]
    return tmp, p, reports


@needs_weights
def test_cfp_set_has_its_protocol_pairs_in_balanced_folds(runs, cfp_root):
    tmp, _, (report, _) = runs
    ps = load_pair_set(tmp / "prep1" / "eval" / "cfp_fp")
    assert ps.num_pairs == 20 and ps.kind == "cfp" and ps.meta["align"] == "detect"
    assert ps.meta["placed_as"] == "center-crop" and ps.images.shape[1:] == (112, 112, 3)
    folds = sorted(set(ps.fold.tolist()))
    assert len(folds) == 10
    for f in folds:
        assert set(ps.same[ps.fold == f].tolist()) == {True, False}
    entry = report["eval"]["cfp_fp"]
    assert entry["protocol"] == "FP" and entry["pairs_in_folds"] == 7000 and entry["pairs"] == 20
    assert entry["identities_excluded_from_training"] == 500
    # The pairs are the reader's pairs, left frontal and right profile, manifest paths under the CFP root.
    want = read_cfp(cfp_root, "FP", max_pairs=20)
    assert ps.same.tolist() == want.same.tolist() and ps.fold.tolist() == want.fold.tolist()
    rows = [r for r in csv.DictReader(open(tmp / "prep1" / "manifest.csv")) if r["split"] == "eval:cfp_fp"]
    assert [r["path"] for r in rows] == [p.relative_to(cfp_root).as_posix() for p in want.paths]
    assert [r["identity"] for r in rows] == want.names
    assert {rows[i]["path"].split("/")[-2] for i in ps.left.tolist()} == {"frontal"}
    assert {rows[i]["path"].split("/")[-2] for i in ps.right.tolist()} == {"profile"}


@needs_weights
def test_detect_alignment_finds_the_faces_and_places_the_crop_box_on_them(runs, cfp_root):
    from crfr.faces.mtcnn import MTCNN
    from crfr.faces.preprocess import prepare_face

    tmp, p, (report, _) = runs
    stats = report["eval"]["cfp_fp"]["align"]
    assert stats["mode"] == "detect" and stats["aligned"] == report["eval"]["cfp_fp"]["images"]
    assert stats["detected"] + stats["fallbacks"] == stats["aligned"]
    assert stats["detected"] >= 0.9 * stats["aligned"], stats
    ps = load_pair_set(tmp / "prep1" / "eval" / "cfp_fp")
    # A frontal face lands where faces sit in deep-funneled LFW, in the crop box's coordinates.
    top, bottom, left, right = p.data.crop_box
    where = (LFW_FUNNELED_LANDMARKS - [left, top]) * [112 / (right - left), 112 / (bottom - top)]
    frontal = sorted(set(ps.left.tolist()))
    errors = []
    for boxes, marks in MTCNN(min_face=40).detect([ps.images[i] for i in frontal]):
        if len(boxes):
            errors.append(np.linalg.norm(marks[pick_face(boxes, (112, 112))] - where, axis=1).mean())
    assert len(errors) >= 0.9 * len(frontal) and np.median(errors) < 4.0, errors
    # Serving aligns a photo with the same code (batched detection may move a pixel value by 1).
    want = read_cfp(cfp_root, "FP", max_pairs=20)
    photo = next(i for i, path in enumerate(want.paths) if min(read_image(path).shape[:2]) > 150)
    served = prepare_face(read_image(want.paths[photo]), {"mode": "center-crop", "crop_box": list(p.data.crop_box)})
    assert np.abs(served.astype(int) - ps.images[photo]).max() <= 2


@needs_weights
def test_a_second_prepare_reads_every_face_from_the_cache(runs):
    tmp, p, (first, second) = runs
    n = first["eval"]["cfp_fp"]["images"]
    c1, c2 = first["eval"]["cfp_fp"]["align_cache"], second["eval"]["cfp_fp"]["align_cache"]
    assert (c1["hits"], c1["misses"], c1["write_errors"]) == (0, n, 0)
    assert (c2["hits"], c2["misses"]) == (n, 0)
    assert c1["dir"] == c2["dir"] and Path(c1["dir"]).is_relative_to(tmp / "cache" / "aligned")
    assert len(list(Path(c1["dir"]).glob("*/*.png"))) == n
    assert json.loads((Path(c1["dir"]) / "settings.json").read_text()) == settings_for("detect", p.data)
    a, b = (load_pair_set(tmp / f"prep{i}" / "eval" / "cfp_fp") for i in (1, 2))
    assert np.array_equal(a.images, b.images)
    assert first["eval"]["cfp_fp"]["align"] == second["eval"]["cfp_fp"]["align"]  # outcome counts cached too
    # The training set (fixed center-crop: no detection) does not use the cache.
    assert first["train"]["align_cache"] is None


@needs_weights
def test_cfp_people_who_are_in_lfw_are_left_out_of_training_by_name(runs, cfp_root):
    tmp, _, (report, _) = runs
    assert set(SHARED_PEOPLE) <= read_cfp(cfp_root, "FP", max_pairs=20).identities
    assert all(len(list((tmp / "lfw/lfw-deepfunneled" / n).iterdir())) >= 4 for n in SHARED_PEOPLE)
    classes = json.loads((tmp / "prep1" / "train" / "index.json").read_text())["classes"]
    assert sorted(classes) == LFW_ONLY
    assert report["train"]["dropped"]["identities_in_eval_pairs"] == len(SHARED_PEOPLE)


# ------------------------------------------------------------------------------------------ the cache itself


def test_align_cache_round_trip_corrupt_entries_and_settings(tmp_path, lfw_face):
    cfg = DataCfg()
    cache = AlignCache(tmp_path, settings_for("detect", cfg))
    sha = "ab" + "0" * 62
    assert cache.get(sha) is None
    cache.put(sha, lfw_face, 2)
    got, found = cache.get(sha)
    assert np.array_equal(got, lfw_face) and found == 2  # lossless
    assert (cache.hits, cache.misses) == (1, 1)
    # Another image_size or crop box is another folder: never a stale crop.
    other = AlignCache(tmp_path, settings_for("detect", DataCfg(crop_box=(60, 190, 66, 184))))
    assert other.dir != cache.dir and other.get(sha) is None
    # A truncated entry is a miss, and is replaced when stored again.
    entry = next(cache.dir.glob(f"*/{sha}.*.png"))
    entry.write_bytes(entry.read_bytes()[:40])
    assert cache.get(sha) is None
    cache.put(sha, lfw_face, 1)
    assert [p.name for p in cache.dir.glob(f"*/{sha}.*")] == [f"{sha}.1.png"]
    assert not list(cache.dir.glob("*/.*.tmp"))  # written under a temporary name, then renamed
    # A cache that cannot be written is counted, not fatal.
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    broken = AlignCache(blocked, settings_for("detect", cfg))
    broken.put(sha, lfw_face, 1)
    assert broken.write_errors == 1 and broken.get(sha) is None


def test_each_eval_kind_resolves_its_alignment(tmp_path, cfp_root, lfw_root):
    data = read_eval_set(EvalSetCfg(name="f", kind="cfp", path=str(cfp_root), protocol="FF", max_pairs=4), None,
                         "lfw-deepfunneled", 10)
    assert data.align_mode == "detect" and data.kind == "cfp" and data.notes["protocol"] == "FF"
    assert data.base == cfp_root and data.refs[0][0].startswith(str(cfp_root)) and len(data.exclude) == 500
    fixed = read_eval_set(EvalSetCfg(name="f", kind="cfp", path=str(cfp_root), protocol="FF", max_pairs=4,
                                     align="fixed"), None, "lfw-deepfunneled", 10)
    assert fixed.align_mode is None
    lfw = read_eval_set(EvalSetCfg(name="l", kind="lfw", folds=[10], max_pairs=4), lfw_root, "lfw-deepfunneled", 10)
    assert lfw.align_mode is None
    assert read_eval_set(EvalSetCfg(name="l", kind="lfw", folds=[10], max_pairs=4, align="detect"), lfw_root,
                         "lfw-deepfunneled", 10).align_mode == "detect"


# ------------------------------------------------------------------------------------------ CSV identities


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def test_csv_person_is_the_first_folder_under_the_image_root(tmp_path, cfp_root):
    rows = ["001/frontal/01.jpg,001/profile/01.jpg,1", "001/frontal/02.jpg,002/profile/01.jpg,0"]
    path = _csv(tmp_path / "pairs.csv", "path1,path2,same", rows)
    es = EvalSetCfg(name="c", kind="csv", path=str(path), image_root=str(cfp_root / "Data/Images"))
    data = read_eval_set(es, None, "lfw-deepfunneled", 2)
    assert [who for _, who in data.refs] == ["001", "001", "001", "002"]  # not "frontal" / "profile"
    assert data.exclude == {"001", "002"} and data.align_mode == "detect"
    # LFW layout gives the person folder, as before.
    lfw_rows = ["Abdullah_Gul/Abdullah_Gul_0001.jpg,Abdullah_Gul/Abdullah_Gul_0002.jpg,1"]
    pair = read_pairs_csv(_csv(tmp_path / "lfw.csv", "path1,path2,same", lfw_rows))[0]
    assert pair_identity(pair, 1) == pair_identity(pair, 2) == "Abdullah_Gul" and pair.id1 is None
    # An image root one level too high puts everyone in one folder: the labels then contradict the people.
    high_csv = _csv(tmp_path / "high.csv", "path1,path2,same", ["Images/001/frontal/02.jpg,Images/002/profile/01.jpg,0"])
    high = EvalSetCfg(name="c", kind="csv", path=str(high_csv), image_root=str(cfp_root / "Data"))
    with pytest.raises(DataError, match=r"high.csv, line 2: a different-person pair of one person .*'Images'"):
        read_eval_set(high, None, "lfw-deepfunneled", 2)


def test_csv_id_columns_name_the_people_in_lfw_spelling(tmp_path, cfp_root):
    names = (cfp_root / "Data/list_name.txt").read_text().splitlines()
    sandler = names.index("Adam Sandler") + 1
    rows = [f"{sandler:03d}/frontal/01.jpg,{sandler:03d}/profile/02.jpg,1,Adam_Sandler,Adam_Sandler",
            f"{sandler:03d}/frontal/02.jpg,001/profile/01.jpg,0,Adam_Sandler,50_Cent"]
    path = _csv(tmp_path / "pairs.csv", "path1,path2,same,id1,id2", rows)
    data = read_eval_set(EvalSetCfg(name="c", kind="csv", path=str(path), image_root=str(cfp_root / "Data/Images")),
                         None, "lfw-deepfunneled", 2)
    assert data.exclude == {"Adam_Sandler", "50_Cent"}  # the names training is filtered by
    assert [who for _, who in data.refs] == ["Adam_Sandler", "Adam_Sandler", "Adam_Sandler", "50_Cent"]
    for header, lines, message in [
        ("path1,path2,same,id1", ["a/x.jpg,b/y.jpg,0,A"], r"line 1: column id1 without id2"),
        ("path1,path2,same,id1,id2", ["a/x.jpg,a/y.jpg,1,A,A", "a/x.jpg,b/y.jpg,0,A,"], r"line 3: id1 and id2"),
    ]:
        with pytest.raises(DataError, match=message):
            read_pairs_csv(_csv(tmp_path / "bad.csv", header, lines))
    mislabelled = f"{sandler:03d}/frontal/01.jpg,{sandler:03d}/profile/02.jpg,1,Adam_Sandler,Adam_Sandler_Jr"
    path = _csv(tmp_path / "label.csv", "path1,path2,same,id1,id2", [mislabelled])
    with pytest.raises(DataError, match=r"label.csv, line 2: a same-person pair of two people .* by its id1/id2"):
        read_eval_set(EvalSetCfg(name="c", kind="csv", path=str(path), image_root=str(cfp_root / "Data/Images")),
                      None, "lfw-deepfunneled", 2)
