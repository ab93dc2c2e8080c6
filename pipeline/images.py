"""Image references that cannot serve stale code: each tag is derived from what the image is built from.

kfp keys its cache on the image string, and Kubernetes pulls a tag once per node: a tag that moves to new code
(``:latest``, or ``0.1.0`` rebuilt) lets a cached step or a retried pod run other code than the one a run was
compiled for. So every image is tagged ``src-<12 hex digits>``, a SHA-256 over the files the Dockerfiles copy
(library, steps, orchestration, the lock files, params.yaml and the Dockerfiles themselves), read by content
(not mtime), so a clean clone and a working tree with the same files give the same tag. The build script
(``docker/build-cpu-image.sh``) tags what it builds with it, and ``crfr pipeline compile`` names it.

One image name per flavour, so no kustomize ``images:`` rewrite of one can retag another:
``crfr-cpu`` (steps), ``crfr-cuda`` (GPU steps), ``crfr-serve`` (``crfr serve``).

    python -m pipeline.images tag           # src-0123456789ab
    python -m pipeline.images ref cpu       # crfr-cpu:src-0123456789ab
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAVOURS = {"cpu": "crfr-cpu", "cuda": "crfr-cuda", "serve": "crfr-serve"}
# What the Dockerfiles COPY. The compiled pipeline is not built into any image, and it names the tag: counting it
# would make the tag depend on itself.
SOURCES = ("crfr", "components", "pipeline", "docker", "pyproject.toml", "params.yaml", "requirements.lock",
           "requirements-nodeps.txt", "prefect.yaml")
NOT_SOURCES = {"pipeline/crfr_pipeline.yaml"}
TAG_PREFIX = "src-"
TAG_HEX = 12


def _files(root: Path) -> list[Path]:
    found = []
    for name in SOURCES:
        path = root / name
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                      and p.suffix not in (".pyc", ".pyo")]
    return sorted(p for p in found if p.relative_to(root).as_posix() not in NOT_SOURCES)


def source_digest(root: Path = REPO, leave_out: frozenset[str] = frozenset()) -> str:
    """SHA-256 (hex) over the relative path and bytes of every file an image is built from.

    Args:
        leave_out: relative paths not counted (the Prefect flow's code version leaves out params.yaml).
    """
    digest = hashlib.sha256()
    for path in _files(root):
        rel = path.relative_to(root).as_posix()
        if rel not in leave_out:
            digest.update(rel.encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def source_tag(root: Path = REPO) -> str:
    """``src-`` and the first 12 hex digits of :func:`source_digest`."""
    return TAG_PREFIX + source_digest(root)[:TAG_HEX]


def has_tag_or_digest(ref: str) -> bool:
    """Whether ``ref`` already names a tag or a digest (a registry port is not a tag)."""
    return "@" in ref or ":" in ref.rsplit("/", 1)[-1]


def resolve(ref: str, root: Path = REPO) -> str:
    """``ref`` as given when it has a tag or digest, else ``ref:<source tag>``."""
    return ref if has_tag_or_digest(ref) else f"{ref}:{source_tag(root)}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["tag"]:
        print(source_tag())
    elif len(args) == 2 and args[0] == "ref" and args[1] in FLAVOURS:
        print(f"{FLAVOURS[args[1]]}:{source_tag()}")
    else:
        print(f"usage: python -m pipeline.images tag | ref {{{','.join(FLAVOURS)}}}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
