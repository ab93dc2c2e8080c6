"""The validation split of the prepare step on real LFW: held-out people, their pairs, and what it never touches."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from components.prepare import prepare
from crfr.config import load_params
from crfr.data.formats.lfw import LfwFolder, pair_identities, select_folds
from crfr.data.pairs import load_pair_set
from crfr.data.split import validation_people
from crfr.data.validation import build_pairs
from crfr.errors import DataError
from crfr.faces.align import Aligner
from crfr.faces.images import read_image

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.max_identities=8", "data.eval_sets=[{name: lfw, kind: lfw, folds: [9, 10], max_pairs: 40}]",
        "data.validation_identities=10", "data.validation_pairs=20"]


def params(*overrides: str):
    return load_params(REPO / "params.yaml", [*TINY, *overrides])


def rows(prepared: Path) -> list[dict]:
    with open(prepared / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(lfw_root, tmp_path_factory):
    """The tiny prepare twice: at the default min_images_per_identity (4) and at 2."""
    out = tmp_path_factory.mktemp("validation")
    got = {}
    for low in (4, 2):
        p = params(f"data.min_images_per_identity={low}")
        report = prepare(str(lfw_root), str(out / f"min{low}"), p, progress=False)
        got[low] = (out / f"min{low}", p, report)
    return got


def test_validation_people_are_held_out_from_training_and_evaluation(runs, lfw_root):
    folder = LfwFolder(lfw_root)
    people = folder.identities()
    evaluated = pair_identities(select_folds(folder.pairs(), [9, 10], folder.root / "pairs.txt"))
    for low, (prepared, p, report) in runs.items():
        manifest = rows(prepared)
        names = {r["identity"] for r in manifest if r["split"] == "validation"}
        assert len(names) == 10 and report["validation"]["identities"] == 10
        assert all(2 <= len(people[n]) <= 3 for n in names)
        classes = set(json.loads((prepared / "train" / "index.json").read_text())["classes"])
        assert len(classes) == 8 and not names & classes
        assert not names & evaluated
        assert not names & {r["identity"] for r in manifest if r["split"] == "eval:lfw"}
        assert report["train"]["dropped"]["identities_in_validation"] == 10
        # At min 2 people with 2-3 images are training classes too: the held-out ones still are not.
        if low == 2:
            assert any(len(people[c]) <= 3 for c in classes)
        assert not (prepared / "eval" / "validation").exists()  # the evaluate step reads eval/ only


def test_pairs_are_balanced_interleaved_and_match_their_people(runs, lfw_root):
    prepared, p, report = runs[4]
    ps = load_pair_set(prepared / "validation")
    owners = [r["identity"] for r in rows(prepared) if r["split"] == "validation"]
    assert len(owners) == len(ps.images) == report["validation"]["images"]
    assert ps.num_pairs == 20 and ps.same.sum() == 10 == report["validation"]["same_pairs"]
    assert ps.same[0::2].all() and not ps.same[1::2].any()
    assert ps.meta["purpose"] == "validation" and ps.meta["identities"] == 10
    who = np.asarray(owners)
    assert np.array_equal(who[ps.left] == who[ps.right], ps.same)
    assert (ps.left != ps.right).all()
    pairs = {tuple(sorted(x)) for x in zip(ps.left.tolist(), ps.right.tolist())}
    assert len(pairs) == ps.num_pairs  # no pair twice
    assert len(set(ps.left.tolist()) | set(ps.right.tolist())) == len(ps.images)  # every stored image is used
    # Aligned like the training images.
    first = next(r for r in rows(prepared) if r["split"] == "validation")
    want = Aligner(p.data)([read_image(lfw_root / first["path"])])[0]
    assert np.array_equal(ps.images[0], want)


def test_the_pick_does_not_depend_on_the_training_minimum(runs):
    a, b = (load_pair_set(runs[low][0] / "validation") for low in (4, 2))
    for field in ("left", "right", "same"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    assert [r for r in rows(runs[4][0]) if r["split"] == "validation"] == \
        [r for r in rows(runs[2][0]) if r["split"] == "validation"]


def test_the_pick_is_seeded_and_stable_as_people_come_and_go():
    people = {f"P{i:03d}": [Path(f"{i}_{k}.jpg") for k in range(2 + i % 4)] for i in range(200)}
    chosen, eligible = validation_people(people, set(), 20, seed=0)
    assert eligible == 100 and len(chosen) == 20 and all(2 <= len(people[n]) <= 3 for n in chosen)
    assert validation_people(people, set(), 20, seed=0)[0] == chosen
    assert validation_people(people, set(), 20, seed=1)[0] != chosen
    # Dropping people nobody picked (or excluding them) leaves the pick as it was.
    others = set(people) - set(chosen)
    fewer = {n: v for n, v in people.items() if n in chosen or n not in sorted(others)[:50]}
    assert validation_people(fewer, set(sorted(others)[50:60]), 20, seed=0)[0] == chosen
    # Excluding a chosen person replaces them, the rest stay.
    again, _ = validation_people(people, {chosen[0]}, 20, seed=0)
    assert set(chosen[1:]) <= set(again) and chosen[0] not in again


def test_build_pairs_with_few_people_stays_balanced():
    owner = np.array([0, 0, 1, 1, 1, 2, 2])  # 1 + 3 + 1 same pairs, 3 pairs of people
    left, right, same = build_pairs(owner, 100, seed=0)
    assert len(same) == 6 and same.sum() == 3 and same[0::2].all()
    assert np.array_equal(owner[left] == owner[right], same)
    assert {tuple(sorted((owner[a], owner[b]))) for a, b, s in zip(left, right, same) if not s} == \
        {(0, 1), (0, 2), (1, 2)}
    again = build_pairs(owner, 100, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip((left, right, same), again))


def _subset(tmp: Path, lfw_root: Path, names: list[str]) -> Path:
    """An LFW root of symlinked images of ``names``; pairs.txt: 1 same, 1 different pair of the last two."""
    root = tmp / "lfw"
    for name in names:
        (root / "lfw-deepfunneled" / name).mkdir(parents=True)
        for f in sorted((lfw_root / "lfw-deepfunneled" / name).glob("*.jpg")):
            os.symlink(f, root / "lfw-deepfunneled" / name / f.name)
    a, b = names[-2:]
    (root / "pairs.txt").write_text(f"1\t1\n{a}\t1\t2\n{a}\t1\t{b}\t2\n")
    return root


def test_fewer_eligible_people_than_asked_is_reported_none_is_an_error(tmp_path, lfw_root, capsys):
    people = LfwFolder(lfw_root).identities()
    big = [n for n, v in sorted(people.items()) if len(v) >= 5][:5]
    small = [n for n, v in sorted(people.items()) if 2 <= len(v) <= 3][:3]
    root = _subset(tmp_path, lfw_root, small + big)
    sets = "data.eval_sets=[{name: lfw, kind: lfw}]"
    report = prepare(str(root), str(tmp_path / "few"), load_params(REPO / "params.yaml", [sets,
                     "data.validation_identities=10", "data.validation_pairs=20"]), progress=False)
    v = report["validation"]
    assert v["identities"] == v["identities_eligible"] == 3 and v["identities_requested"] == 10
    assert "only 3 people" in v["note"] and "data.validation_identities" in v["note"]
    assert v["pairs"] == 2 * v["same_pairs"] and v["same_pairs"] <= 3
    assert "crfr: warning: validation split: only 3 people" in capsys.readouterr().err

    none = _subset(tmp_path / "none", lfw_root, big)
    with pytest.raises(DataError, match=r"data.validation_identities=10: .* no person with 2-3 images"):
        prepare(str(none), str(tmp_path / "none-out"), load_params(REPO / "params.yaml", [sets,
                "data.validation_identities=10"]), progress=False)
    assert not (tmp_path / "none-out").exists()


def test_recordio_training_refuses_a_validation_split_before_any_work(tmp_path):
    p = load_params(REPO / "params.yaml", ["data.train=recordio", f"data.train_rec={tmp_path / 'missing.rec'}",
                                           "data.validation_identities=5"])
    with pytest.raises(DataError, match=r"data.validation_identities=5: .*data.train: lfw"):
        prepare(None, str(tmp_path / "out"), p, progress=False)
