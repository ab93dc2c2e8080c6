"""The CFP reader on the real dataset in ../shared/data/cfp: the official protocols, names, folds, bad files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from crfr import storage
from crfr.config import StorageCfg
from crfr.data.formats.cfp import PROTOCOLS, read_cfp, read_names
from crfr.errors import CrfrError, DataError
from tests.facedata import IMAGES as LFW_IMAGES

CFP_ROOT = Path(os.environ.get("CRFR_CFP_ROOT", Path(__file__).resolve().parents[2] / "shared/data/cfp"))


@pytest.fixture(scope="module")
def cfp_root() -> Path:
    if not (CFP_ROOT / "Protocol/Pair_list_F.txt").is_file():
        pytest.skip(f"CFP not found at {CFP_ROOT} (set CRFR_CFP_ROOT)")
    return CFP_ROOT


@pytest.fixture(scope="module")
def full(cfp_root):
    return {p: read_cfp(cfp_root, p) for p in PROTOCOLS}


def pair_names(d) -> list[tuple[str, str]]:
    return [(d.names[a], d.names[b]) for a, b in zip(d.left.tolist(), d.right.tolist())]


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_each_protocol_has_7000_pairs_in_10_balanced_folds(full, protocol):
    d = full[protocol]
    assert d.num_pairs == d.pairs_in_folds == 7000 and d.protocol == protocol
    assert d.fold.tolist() == sorted(d.fold.tolist())  # folds contiguous: the verification protocol's folds
    for f in range(1, 11):
        in_fold = d.same[d.fold == f]
        assert len(in_fold) == 700 and in_fold.sum() == 350
        assert in_fold[0::2].all() and not in_fold[1::2].any()  # same and different alternate
    assert len(d.identities) == 500


def test_sides_are_the_protocol_images(full):
    ff, fp = full["FF"], full["FP"]
    assert {ff.paths[i].parts[-2] for i in np.concatenate([ff.left, ff.right])} == {"frontal"}
    assert {fp.paths[i].parts[-2] for i in fp.left} == {"frontal"}
    assert {fp.paths[i].parts[-2] for i in fp.right} == {"profile"}
    assert len(ff.paths) == len(set(ff.paths))  # each image once, pairs refer to rows
    assert all(p.is_file() for p in fp.paths)
    # the first pair of FP fold 1 as the files give it: same.txt line 1 of Split/FP/01
    first = (CFP_ROOT / "Protocol/Split/FP/01/same.txt").read_text().splitlines()[0].split(",")
    f_list = (CFP_ROOT / "Protocol/Pair_list_F.txt").read_text().splitlines()
    p_list = (CFP_ROOT / "Protocol/Pair_list_P.txt").read_text().splitlines()
    want_left = f_list[int(first[0]) - 1].split()[1].replace("../", "")
    want_right = p_list[int(first[1]) - 1].split()[1].replace("../", "")
    assert fp.paths[fp.left[0]].relative_to(CFP_ROOT).as_posix() == want_left
    assert fp.paths[fp.right[0]].relative_to(CFP_ROOT).as_posix() == want_right


def test_identities_come_from_the_person_folder_and_list_name(full, cfp_root):
    names = read_names(cfp_root / "Data/list_name.txt")
    assert len(names) == 500 and names[0] == "50_Cent" and names[1] == "Aaron_Hernandez"
    for d in full.values():
        for path, name in zip(d.paths, d.names):
            assert name == names[int(path.parts[-3]) - 1]  # NNN/frontal/x.jpg is person NNN, not "frontal"
        assert not {"frontal", "profile"} & set(d.names)
        assert all(a == b for (a, b), s in zip(pair_names(d), d.same) if s)
        assert all(a != b for (a, b), s in zip(pair_names(d), d.same) if not s)


def test_172_people_are_matched_with_lfw_by_name(full):
    if not LFW_IMAGES.is_dir():
        pytest.skip(f"LFW not found at {LFW_IMAGES}")
    lfw = {p.name for p in LFW_IMAGES.iterdir() if p.is_dir()}
    assert len(full["FP"].identities & lfw) == 172
    assert "Aaron_Rodgers" not in lfw and "Adam_Sandler" in lfw and "Adam_Sandler" in full["FF"].identities


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_folds_are_disjoint_in_identity(full, protocol):
    d = full[protocol]
    people = {f: {d.names[i] for i in np.concatenate([d.left[d.fold == f], d.right[d.fold == f]])}
              for f in range(1, 11)}
    for f in range(1, 11):
        for g in range(f + 1, 11):
            assert not people[f] & people[g], (f, g)
    assert sum(len(p) for p in people.values()) == 500


def test_max_pairs_keeps_every_fold_balanced_and_the_exclusion_whole(full, cfp_root):
    d = read_cfp(cfp_root, "FP", max_pairs=100)
    assert d.num_pairs == 100 and d.pairs_in_folds == 7000
    for f in range(1, 11):
        in_fold = d.same[d.fold == f]
        assert len(in_fold) == 10 and in_fold.tolist() == [True, False] * 5
    assert d.identities == full["FP"].identities  # leak exclusion before the cap
    whole = set(zip([full["FP"].paths[i] for i in full["FP"].left], [full["FP"].paths[i] for i in full["FP"].right]))
    assert set(zip([d.paths[i] for i in d.left], [d.paths[i] for i in d.right])) <= whole
    assert len(d.paths) == len(set(np.concatenate([d.left, d.right]).tolist()))  # only images of kept pairs


def test_fold_selection(full, cfp_root):
    d = read_cfp(cfp_root, "FF", folds=[9, 10])
    assert d.num_pairs == 1400 and set(d.fold.tolist()) == {9, 10}
    everyone = full["FF"]
    assert d.identities == set(np.asarray(everyone.names)[np.concatenate(
        [everyone.left[everyone.fold >= 9], everyone.right[everyone.fold >= 9]])].tolist())
    with pytest.raises(DataError, match=r"Split/FF: no fold 11 \(it has folds 1, 2, .*10\)"):
        read_cfp(cfp_root, "FF", folds=[11])
    with pytest.raises(DataError, match="CFP protocol 'PF' is not one of FF, FP"):
        read_cfp(cfp_root, "PF")


# ------------------------------------------------------------------------------------------ bad files


@pytest.fixture
def copy(cfp_root, tmp_path):
    """A CFP root whose text files are copies (to break) and whose image folder is the real one."""
    root = tmp_path / "cfp"
    shutil.copytree(cfp_root / "Protocol", root / "Protocol")
    (root / "Data").mkdir()
    shutil.copyfile(cfp_root / "Data/list_name.txt", root / "Data/list_name.txt")
    (root / "Data/Images").symlink_to(cfp_root / "Data/Images")
    return root


def edit_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_the_copy_reads_as_the_original(copy, full):
    d = read_cfp(copy, "FP")
    assert pair_names(d) == pair_names(full["FP"]) and d.fold.tolist() == full["FP"].fold.tolist()


@pytest.mark.parametrize("file, lineno, text, message", [
    ("Protocol/Pair_list_F.txt", 7, "8 ../Data/Images/001/frontal/07.jpg",
     r"Pair_list_F.txt, line 7: index 8 out of sequence \(expected 7\)"),
    ("Protocol/Pair_list_F.txt", 3, "3", r"Pair_list_F.txt, line 3: expected 'index path', got '3'"),
    ("Protocol/Pair_list_F.txt", 3, "3 ../../../../etc/passwd", "Pair_list_F.txt, line 3: path .* leads outside"),
    ("Protocol/Pair_list_F.txt", 3, "3 /etc/passwd", "Pair_list_F.txt, line 3: path '/etc/passwd' must be relative"),
    ("Protocol/Pair_list_P.txt", 5, "5 ../Data/Images/002/frontal/01.jpg",
     r"Pair_list_P.txt, line 5: path .* is not \.\.\./NNN/profile/<image>"),
    ("Protocol/Pair_list_F.txt", 4, "4 ../Data/Images/frontal/04.jpg", r"line 4: .* is not \.\.\./NNN/frontal/"),
    ("Protocol/Pair_list_F.txt", 4, "4 ../Data/Images/501/frontal/04.jpg",
     r"Pair_list_F.txt, line 4: person 501 .* is not in .*list_name.txt \(500 names\)"),
    ("Protocol/Split/FP/03/same.txt", 2, "17;4", r"FP/03/same.txt, line 2: expected 'i,j'"),
    ("Protocol/Split/FP/03/diff.txt", 9, "5001,3", r"FP/03/diff.txt, line 9: first image 5001 is not in its list"),
    ("Protocol/Split/FP/03/diff.txt", 9, "1,2001", r"FP/03/diff.txt, line 9: second image 2001 is not in its list"),
    ("Protocol/Split/FP/01/same.txt", 3, "1,5", r"FP/01/same.txt, line 3: images 1 and 5 are of two people "
                                                r"\(50_Cent, Aaron_Hernandez\) in a same-person list"),
    ("Protocol/Split/FP/01/diff.txt", 1, "1,1", r"FP/01/diff.txt, line 1: images 1 and 1 are of one person"),
    ("Data/list_name.txt", 3, "", r"list_name.txt, line 3: blank line \(line N must name person N\)"),
    ("Data/list_name.txt", 4, "50 Cent", r"list_name.txt, line 4: '50 Cent' is already person 1"),
    ("Protocol/Pair_list_F.txt", 1, "1 ../Data/Images/001/frontal/99.jpg",
     r"Split/FP/\d\d/(same|diff).txt, line \d+: image .*001/frontal/99.jpg \(from .*Pair_list_F.txt\) does not exist"),
])
def test_bad_lines_are_named_with_file_and_line(copy, file, lineno, text, message):
    edit_line(copy / file, lineno, text)
    with pytest.raises(DataError, match=message) as info:
        read_cfp(copy, "FP")
    assert isinstance(info.value, CrfrError) and "\n" not in str(info.value)


@pytest.mark.parametrize("missing", ["Protocol/Pair_list_P.txt", "Data/list_name.txt",
                                     "Protocol/Split/FP/04/diff.txt"])
def test_missing_files_are_named(copy, missing):
    (copy / missing).unlink()
    with pytest.raises(DataError, match=f"CFP file .*{missing} is missing"):
        read_cfp(copy, "FP")


def test_missing_protocol_folder_and_non_text_files(copy):
    shutil.rmtree(copy / "Protocol/Split/FF")
    with pytest.raises(DataError, match="CFP protocol folder .*Split/FF is missing"):
        read_cfp(copy, "FF")
    (copy / "Protocol/Split/FP/02/same.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="FP/02/same.txt: not a UTF-8 text file"):
        read_cfp(copy, "FP")
    (copy / "Protocol/Split/FP/02/same.txt").write_text("\n\n")
    with pytest.raises(DataError, match="FP/02/same.txt: no pairs"):
        read_cfp(copy, "FP")
    with pytest.raises(CrfrError, match="input not found: .*nowhere"):
        read_cfp(copy / "nowhere", "FP")


# ----------------------------------------------------------------------------------------------- S3


def mini_cfp(cfp_root: Path, dest: Path, people: int = 4) -> Path:
    """The real CFP cut to its first people: their images and every fold-1 FF pair among them."""
    n_f, n_p = 10 * people, 4 * people
    for n in range(1, people + 1):
        shutil.copytree(cfp_root / f"Data/Images/{n:03d}", dest / f"Data/Images/{n:03d}")
    shutil.copyfile(cfp_root / "Data/list_name.txt", dest / "Data/list_name.txt")
    (dest / "Protocol/Split/FF/01").mkdir(parents=True)
    for name, count in (("Pair_list_F.txt", n_f), ("Pair_list_P.txt", n_p)):
        lines = (cfp_root / "Protocol" / name).read_text().splitlines()[:count]
        (dest / "Protocol" / name).write_text("\n".join(lines) + "\n")
    for name in ("same.txt", "diff.txt"):
        lines = [x for x in (cfp_root / "Protocol/Split/FF/01" / name).read_text().splitlines()
                 if max(map(int, x.split(","))) <= n_f]
        (dest / "Protocol/Split/FF/01" / name).write_text("\n".join(lines) + "\n")
    return dest


def test_an_s3_root_reads_as_its_local_copy(cfp_root, s3_server, tmp_path):
    import uuid

    storage.configure(StorageCfg(cache_dir=str(tmp_path / "cache")))
    try:
        local = mini_cfp(cfp_root, tmp_path / "mini")
        bucket = f"crfr-{uuid.uuid4().hex[:12]}"
        storage.client().create_bucket(Bucket=bucket)
        storage.upload(local, f"s3://{bucket}/datasets/cfp")
        want = read_cfp(local, "FF")
        got = read_cfp(f"s3://{bucket}/datasets/cfp", "FF")
        assert want.num_pairs == 29 and want.same.sum() == 28  # four people: 28 same pairs, one different
        assert got.source == f"s3://{bucket}/datasets/cfp" and got.root.is_relative_to(tmp_path / "cache")
        assert pair_names(got) == pair_names(want) and got.fold.tolist() == want.fold.tolist()
        assert [p.relative_to(got.root) for p in got.paths] == [p.relative_to(local) for p in want.paths]
        assert all(p.read_bytes() == q.read_bytes() for p, q in zip(got.paths, want.paths))
    finally:
        storage.configure(None)
