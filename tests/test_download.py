"""The LFW downloader against a local HTTP server: resume by Range, checksum errors, safe extraction."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from crfr.data import download as dl
from crfr.errors import DataError


class _Server:
    """Serves ``files`` (path -> bytes) with Range support; ``cut[path] = n`` drops the connection after n body
    bytes of the next response (once)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = server.cut.pop(self.path, None)
                if cut is not None:
                    self.wfile.write(part[:cut])
                    self.wfile.flush()
                    self.close_connection = True  # the client sees the body end early
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verifies_checksum(server, tmp_path):
    body = os.urandom(300_000)
    server.files["/f"] = body
    out = dl.download(server.url + "/f", tmp_path / "f.bin", _sha(body), progress=False)
    assert out.read_bytes() == body and not (tmp_path / "f.bin.part").exists()
    # Present with the right checksum: nothing is fetched again.
    n = len(server.requests)
    dl.download(server.url + "/f", tmp_path / "f.bin", _sha(body), progress=False)
    assert len(server.requests) == n


def test_checksum_mismatch_is_a_clear_error(server, tmp_path):
    server.files["/f"] = b"not what you wanted"
    with pytest.raises(DataError, match=r"checksum mismatch for .*f.bin: expected sha256 0{64}, got [0-9a-f]{64}"):
        dl.download(server.url + "/f", tmp_path / "f.bin", "0" * 64, progress=False)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_interrupted_download_resumes_from_part_file(server, tmp_path):
    body = os.urandom(3 * dl.CHUNK + 12345)
    server.files["/big"] = body
    server.cut["/big"] = 1_000_000
    out = dl.download(server.url + "/big", tmp_path / "big", _sha(body), progress=False, backoff=0.01)
    assert out.read_bytes() == body
    assert server.requests == [("/big", None), ("/big", "bytes=1000000-")]


def test_resume_of_a_leftover_part_and_a_server_that_ignores_range(server, tmp_path):
    body = os.urandom(200_000)
    server.files["/f"] = body
    (tmp_path / "f.part").write_bytes(body[:5000])
    dl.download(server.url + "/f", tmp_path / "f", _sha(body), progress=False)
    assert server.requests[-1] == ("/f", "bytes=5000-") and (tmp_path / "f").read_bytes() == body
    server.ignore_range = True  # answers 200 with the whole file: the part must restart, not be appended to
    (tmp_path / "g.part").write_bytes(body[:5000])
    dl.download(server.url + "/f", tmp_path / "g", _sha(body), progress=False)
    assert (tmp_path / "g").read_bytes() == body


def test_http_errors_and_giving_up(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        dl.download(server.url + "/missing", tmp_path / "x", None, progress=False)
    body = os.urandom(50_000)
    server.files["/f"] = body
    server.cut["/f"] = 100
    with pytest.raises(DataError, match=r"gave up after 1 attempts \(100 bytes kept in .*x.part"):
        dl.download(server.url + "/f", tmp_path / "x", _sha(body), retries=0, progress=False)
    dl.download(server.url + "/f", tmp_path / "x", _sha(body), progress=False)  # the next call resumes
    assert server.requests[-1] == ("/f", "bytes=100-")


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize(
    "member, message",
    [
        (_file("../escape.txt"), "would be written outside"),
        (_file("/abs.txt"), "would be written outside"),
        (_link("lfw/evil", "/etc/passwd"), "points outside"),
        (_link("lfw/evil", "../../x"), "points outside"),
        (_link("lfw/hard", "../x", tarfile.LNKTYPE), "points outside"),
    ],
)
def test_unsafe_archives_are_refused(tmp_path, member, message):
    archive = tmp_path / "a.tgz"
    archive.write_bytes(_tar([_file("lfw/ok.txt"), member]))
    with pytest.raises(DataError, match=message):
        dl.safe_extract(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "lfw" / "ok.txt").exists()


def test_fetch_lfw_from_a_mirror(server, tmp_path, monkeypatch):
    jpg = b"\xff\xd8\xff\xe0fake"
    archive = _tar([_file("lfw_funneled/Ann/Ann_0001.jpg", jpg),
                    _link("lfw_funneled/Ann/Ann_0002.jpg", "Ann_0001.jpg")])
    server.files["/lfw-funneled.tgz"] = archive
    pairs = {name: f"1\n{name}\n".encode() for name in dl.LFW_PAIR_FILES}
    for name, data in pairs.items():
        server.files[f"/{name}"] = data
    monkeypatch.setattr(dl, "LFW_ARCHIVES", {"lfw_funneled": dl.Mirror(
        server.url + "/lfw-funneled.tgz", _sha(archive), len(archive), "lfw_funneled")})
    monkeypatch.setattr(dl, "LFW_PAIR_FILES", {n: dl.Mirror(f"{server.url}/{n}", None) for n in pairs})
    root, subdir = dl.fetch_lfw(tmp_path / "lfw", tmp_path / "dl", "lfw-deepfunneled", progress=False)
    assert subdir == "lfw_funneled"  # deep-funneled has no mirror: the funneled variant stands in
    assert (root / "lfw_funneled/Ann/Ann_0001.jpg").read_bytes() == jpg
    assert (root / "lfw_funneled/Ann/Ann_0002.jpg").read_bytes() == jpg
    assert (root / "pairs.txt").read_bytes() == pairs["pairs.txt"]
    assert (tmp_path / "dl" / "lfw_funneled.tgz").is_file()
    before = len(server.requests)
    dl.fetch_lfw(tmp_path / "lfw", tmp_path / "dl", "lfw_funneled", progress=False)
    assert len(server.requests) == before  # everything is there: no request at all
