"""Downloader against a local HTTP server: full and resumed downloads, checksums, unsafe archives, server down."""
from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from LesionLocatorLib.errors import Cancelled
from LesionLocatorLib.models.download import (
    ChecksumMismatchError,
    DownloadError,
    LicenceNotAcceptedError,
    UnsafeArchiveError,
    download_model,
    extract_archive,
)
from LesionLocatorLib.models.registry import DOWNLOAD, ModelSource
from test_models_registry import TINY, write_model_root

ARCHIVE_PATH = "/files/model.zip"
WRAPPER = "LesionLocatorCheckpoint"


class ArchiveServer:
    """Serves files over HTTP on 127.0.0.1 with Range support; can cut the next response after N bytes."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.cut_after: int | None = None
        self.honour_range = True
        self.ranges: list[str | None] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.archive_server = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        state: ArchiveServer = self.server.archive_server
        body = state.files.get(urlsplit(self.path).path)
        requested_range = self.headers.get("Range")
        state.ranges.append(requested_range)
        if body is None:
            self.send_error(404)
            return
        start = int(re.match(r"bytes=(\d+)-", requested_range).group(1)) if requested_range else 0
        if requested_range and state.honour_range:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            start = 0
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if state.cut_after is not None:
            payload, state.cut_after = payload[: state.cut_after], None
            self.close_connection = True
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def zip_folder(root: Path, prefix: str = WRAPPER) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, f"{prefix}/{path.relative_to(root).as_posix()}")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_archive(tmp_path_factory) -> bytes:
    """The tiny official-format checkpoint zipped like the Zenodo archive (a synthetic one if it is missing)."""
    root = TINY if TINY.is_dir() else write_model_root(tmp_path_factory.mktemp("synthetic") / "m")
    return zip_folder(root)


@pytest.fixture
def server(model_archive):
    archive_server = ArchiveServer({ARCHIVE_PATH: model_archive})
    yield archive_server
    archive_server.close()


def make_source(server: ArchiveServer, body: bytes, **changes) -> ModelSource:
    source = ModelSource(
        name="testmodel", kind=DOWNLOAD, description="test", licence="Test Licence 1.0",
        licence_url=f"{server.base_url}/licence", requires_licence_acceptance=True,
        url=server.base_url + ARCHIVE_PATH, archive_name="model.zip", size_bytes=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
    )
    return replace(source, **changes)


def files_in(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def test_full_download_installs_a_loadable_model(server, model_archive, tmp_path):
    reports = []
    root = download_model(make_source(server, model_archive), tmp_path, accept_licence=True,
                          progress=lambda fraction, stage: reports.append(fraction))
    assert root == tmp_path / "models" / "testmodel"
    assert (root / "LesionLocatorSeg" / "point_optimized" / "plans.json").is_file()
    assert reports[-1] == 1.0 and reports == sorted(reports)
    assert files_in(tmp_path / "downloads") == [] and sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "testmodel"
    ]
    assert download_model(make_source(server, model_archive), tmp_path, accept_licence=True) == root
    assert server.ranges == [None], "an installed model is not downloaded again"
    if TINY.is_dir():
        from LesionLocatorLib.checkpoint import load_checkpoint_folder

        model = load_checkpoint_folder(root / "LesionLocatorSeg" / "point_optimized")
        assert sorted(model.fold_weights) == [0, 1] and model.configuration_name == "3d_fullres_bs3"


def test_interrupted_download_resumes_with_a_range_request(server, model_archive, tmp_path):
    cut = len(model_archive) // 3
    server.cut_after = cut
    source = make_source(server, model_archive)
    with pytest.raises(DownloadError, match="interrupted.*resume"):
        download_model(source, tmp_path, accept_licence=True, attempts=1)
    assert (tmp_path / "downloads" / "model.zip.part").stat().st_size == cut
    download_model(source, tmp_path, accept_licence=True)
    assert server.ranges == [None, f"bytes={cut}-"]
    assert (tmp_path / "models" / "testmodel" / "LesionLocatorTrack" / "plans.json").is_file()


def test_an_interruption_is_retried_within_one_call(server, model_archive, tmp_path):
    server.cut_after = len(model_archive) // 2
    download_model(make_source(server, model_archive), tmp_path, accept_licence=True)
    assert server.ranges == [None, f"bytes={len(model_archive) // 2}-"]


def test_a_server_ignoring_range_restarts_cleanly(server, model_archive, tmp_path):
    server.cut_after = len(model_archive) // 2
    server.honour_range = False
    download_model(make_source(server, model_archive), tmp_path, accept_licence=True)
    assert len(server.ranges) == 2 and (tmp_path / "models" / "testmodel").is_dir()


def test_wrong_checksum_is_rejected_and_nothing_is_left(server, model_archive, tmp_path):
    with pytest.raises(ChecksumMismatchError, match="sha256.*deleted"):
        download_model(make_source(server, model_archive, sha256="0" * 64), tmp_path, accept_licence=True)
    assert files_in(tmp_path) == []
    assert not (tmp_path / "models" / "testmodel").exists()


def test_published_md5_from_the_record_is_used(server, model_archive, tmp_path):
    def record(md5: str) -> bytes:
        entry = {"key": "model.zip", "size": len(model_archive), "checksum": f"md5:{md5}"}
        return json.dumps({"files": {"entries": {"model.zip": entry}}}).encode()

    server.files["/api/records/1"] = record(hashlib.md5(model_archive).hexdigest())
    source = make_source(server, model_archive, size_bytes=None, sha256=None,
                         metadata_url=server.base_url + "/api/records/1")
    assert download_model(source, tmp_path, accept_licence=True).is_dir()
    server.files["/api/records/1"] = record("f" * 32)
    with pytest.raises(ChecksumMismatchError, match="md5"):
        download_model(source, tmp_path / "other", accept_licence=True)


def test_path_traversal_archive_is_rejected(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{WRAPPER}/LesionLocatorTrack/plans.json", "{}")
        archive.writestr("../escaped.txt", "owned")
    server.files[ARCHIVE_PATH] = buffer.getvalue()
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./escaped\.txt' would be written outside"):
        download_model(make_source(server, buffer.getvalue()), tmp_path / "cache", accept_licence=True)
    assert files_in(tmp_path) == []


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = tarfile.SYMTYPE, target
    return member


@pytest.mark.parametrize(
    "archive_bytes",
    [
        _tar_with(tarfile.TarInfo("/tmp/absolute.txt"), b"x"),
        _tar_with(tarfile.TarInfo("model/../../up.txt"), b"x"),
        _tar_with(_symlink("model/link", "/etc")),
        _tar_with(_symlink("model/link", "../../outside")),
    ],
    ids=["absolute", "dotdot", "symlink-absolute", "symlink-relative"],
)
def test_unsafe_tar_entries_are_rejected_before_writing(tmp_path, archive_bytes):
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(archive_bytes)
    with pytest.raises(UnsafeArchiveError, match="nothing was installed"):
        extract_archive(archive, tmp_path / "out")
    assert files_in(tmp_path / "out") == []


def test_tar_archive_installs(server, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(write_model_root(tmp_path / "src"), arcname=WRAPPER)
    server.files[ARCHIVE_PATH] = buffer.getvalue()
    root = download_model(make_source(server, buffer.getvalue()), tmp_path / "cache", accept_licence=True)
    assert (root / "LesionLocatorSeg" / "bbox_optimized" / "fold_0" / "checkpoint_final.pth").is_file()


def test_server_down_says_where_to_download_and_where_to_put_it(model_archive, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = ModelSource(name="testmodel", kind=DOWNLOAD, description="test", licence="free",
                         url=f"http://127.0.0.1:{port}/model.zip", archive_name="model.zip",
                         sha256="0" * 64, homepage="https://example.org/record")
    with pytest.raises(DownloadError) as error:
        download_model(source, tmp_path, attempts=1, timeout_s=5)
    message = str(error.value)
    assert "offline or the server is down" in message and "https://example.org/record" in message
    assert str(tmp_path / "models" / "testmodel") in message


def test_http_error_is_not_retried(server, model_archive, tmp_path):
    source = make_source(server, model_archive, url=server.base_url + "/missing.zip")
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_model(source, tmp_path, accept_licence=True)
    assert server.ranges == [None]


def test_licence_must_be_accepted_before_any_request(server, model_archive, tmp_path):
    with pytest.raises(LicenceNotAcceptedError, match="--accept-licence"):
        download_model(make_source(server, model_archive), tmp_path)
    assert server.ranges == []


def test_cancel_keeps_the_part_file_for_resuming(server, model_archive, tmp_path):
    cancel = threading.Event()
    server.cut_after = len(model_archive) // 2  # the first response ends early, so the cancel lands mid-file
    source = make_source(server, model_archive)

    def progress(fraction: float, stage: str) -> None:
        if fraction > 0:
            cancel.set()

    with pytest.raises(Cancelled, match="resumes"):
        download_model(source, tmp_path, accept_licence=True, progress=progress, cancel=cancel, attempts=2)
    kept = (tmp_path / "downloads" / "model.zip.part").stat().st_size
    assert 0 < kept < len(model_archive)
    download_model(source, tmp_path, accept_licence=True)
    assert server.ranges[-1] == f"bytes={kept}-"
