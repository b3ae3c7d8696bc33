"""Model downloads: streamed to a resumable `.part` file, verified, extracted safely, moved into the cache atomically.

Only a verified archive is ever extracted, extraction happens in a staging folder inside the cache, and the model
appears at `<cache>/models/<name>` through one rename. A failed or cancelled download leaves at most the `.part`
file (resumed by the next attempt with an HTTP Range request); a `.part` whose checksum fails is deleted.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .. import __version__
from ..errors import Cancelled, LesionLocatorError
from .cache import CACHE_ENV_VAR, STAGING_PREFIX, installed_model_dir, part_file, user_cache_dir
from .layout import ModelLayoutError, find_model_root, validate_model_root
from .registry import DOWNLOAD, ModelSource, download_instructions, get_source, model_status

ProgressCallback = Callable[[float, str], None]

CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_ATTEMPTS = 3
USER_AGENT = f"LesionLocatorLib/{__version__} (+https://github.com/MIC-DKFZ/LesionLocator)"
# Progress fractions: downloading takes most of the time, hashing and extracting the rest.
DOWNLOAD_END = 0.90
VERIFY_END = 0.95
EXTRACT_END = 0.99
MB = 1e6


class DownloadError(LesionLocatorError):
    """A model could not be downloaded or installed."""


class LicenceNotAcceptedError(LesionLocatorError):
    """The model's licence must be accepted before it is downloaded."""


class ChecksumMismatchError(DownloadError):
    """The downloaded archive is not the published file (corrupt or tampered); it was deleted."""


class UnusableArchiveError(DownloadError):
    """A verified archive that holds no usable model (unknown format, unsafe entries, incomplete layout)."""


class UnsafeArchiveError(UnusableArchiveError):
    """The archive holds entries that would escape the target folder (absolute paths, '..', links)."""


class _Interrupted(Exception):
    """A transient network failure: the next attempt resumes from the `.part` file."""


@dataclass(frozen=True)
class ExpectedArchive:
    """What the verified archive must be: its size (if published) and at least one checksum."""

    size_bytes: int | None
    sha256: str | None = None
    md5: str | None = None


@dataclass
class _Job:
    source: ModelSource
    target: Path
    part: Path
    report: Callable[[float, str], None]
    cancel: threading.Event | None
    timeout_s: float

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(
                f"Download of '{self.source.name}' cancelled. The partial file {self.part} is kept; "
                "the next download resumes from it."
            )

    def manual_hint(self) -> str:
        return download_instructions(self.source, self.target)


def require_licence(source: ModelSource, accepted: bool) -> None:
    if source.requires_licence_acceptance and not accepted:
        raise LicenceNotAcceptedError(
            f"Model '{source.name}' may only be downloaded after you accept its licence: {source.licence}. "
            f"Read it at {source.licence_url}, then accept it: pass accept_licence=True, or run "
            f"`lesionlocator models download {source.name} --accept-licence`, or tick the licence box in Slicer."
        )


def download_model(
    model: str | ModelSource,
    cache_dir: str | os.PathLike | None = None,
    *,
    accept_licence: bool = False,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    force: bool = False,
    attempts: int = DEFAULT_ATTEMPTS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Download, verify and install a model; returns its root folder (`<cache>/models/<name>`).

    A model already installed is returned as is unless `force`. Network interruptions are retried up to
    `attempts` times, each resuming where the previous one stopped.
    """
    source = get_source(model) if isinstance(model, str) else model
    if source.kind != DOWNLOAD:
        raise DownloadError(f"Model '{source.name}' is a {source.kind} model: there is nothing to download.")
    require_licence(source, accept_licence)
    cache = user_cache_dir(cache_dir)
    job = _Job(source, installed_model_dir(cache, source.name), part_file(cache, source.archive_name),
               _clamped(progress), cancel, timeout_s)
    if not force and model_status(source, cache).installed:
        job.report(1.0, f"{source.name} is already installed")
        return job.target
    expected = _expected_archive(job)
    _fetch(job, expected, max(1, attempts))
    _verify_archive(job, expected)
    try:
        _install(job)
    except UnusableArchiveError:
        job.part.unlink()  # downloading the same file again cannot help
        raise
    job.part.unlink()
    job.report(1.0, f"{source.name} installed in {job.target}")
    return job.target


def _clamped(progress: ProgressCallback | None) -> Callable[[float, str], None]:
    def report(fraction: float, stage: str) -> None:
        if progress is not None:
            progress(min(max(fraction, 0.0), 1.0), stage)

    return report


def _expected_archive(job: _Job) -> ExpectedArchive:
    """The pinned size and checksums, or those the server publishes; never an unverifiable download."""
    source = job.source
    if source.sha256 or source.md5:
        return ExpectedArchive(source.size_bytes, source.sha256, source.md5)
    if not source.metadata_url:
        raise DownloadError(f"Model '{source.name}' has no checksum to verify a download against; refusing it.")
    job.report(0.0, f"Reading the file list of {source.metadata_url}")
    return _archive_from_record(job, _read_json(job, source.metadata_url))


def _read_json(job: _Job, url: str) -> dict:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=job.timeout_s) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        raise DownloadError(
            f"Could not read the model's file list from {url} ({_reason(error)}). If you are offline or the server "
            f"is down: {job.manual_hint()}"
        ) from error


def _archive_from_record(job: _Job, record: dict) -> ExpectedArchive:
    """Size and checksum of the archive in a Zenodo record (`files` as a list or as `{"entries": {...}}`)."""
    files = record.get("files", [])
    entries = files.get("entries", {}).values() if isinstance(files, dict) else files
    for entry in entries:
        if entry.get("key") == job.source.archive_name:
            algorithm, _, digest = str(entry.get("checksum", "")).partition(":")
            size = entry.get("size")
            if algorithm in ("md5", "sha256") and digest:
                return ExpectedArchive(int(size) if size is not None else None, **{algorithm: digest.lower()})
    raise DownloadError(
        f"{job.source.metadata_url} lists no checksummed file named {job.source.archive_name}; the record changed. "
        f"{job.manual_hint()}"
    )


def _fetch(job: _Job, expected: ExpectedArchive, attempts: int) -> None:
    job.part.parent.mkdir(parents=True, exist_ok=True)
    reason = ""
    for _ in range(attempts):
        if expected.size_bytes is not None and _part_size(job.part) == expected.size_bytes:
            return
        try:
            _fetch_once(job, expected.size_bytes)
            return
        except _Interrupted as interruption:
            reason = str(interruption)
    received = _part_size(job.part)
    if received:
        raise DownloadError(
            f"Download of '{job.source.name}' interrupted after {received / MB:.1f} MB ({reason}). Run the download "
            f"again to resume it from {job.part}. {job.manual_hint()}"
        )
    raise DownloadError(
        f"Could not download '{job.source.name}' from {job.source.url} ({reason}). If you are offline or the "
        f"server is down: {job.manual_hint()}"
    )


def _part_size(part: Path) -> int:
    return part.stat().st_size if part.exists() else 0


def _fetch_once(job: _Job, expected_size: int | None) -> None:
    offset = _part_size(job.part)
    if expected_size is not None and offset > expected_size:
        job.part.unlink()
        offset = 0
    response = _open(job, offset)
    with response:
        if offset and not _resumes_at(response, offset):
            offset = 0  # the server ignored the Range header: start over
        total = _total_size(response, offset) or expected_size
        with open(job.part, "ab" if offset else "wb") as out:
            received = _stream(job, response, out, offset, total)
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received} of {total} bytes")


def _open(job: _Job, offset: int) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(job.source.url, headers=headers), timeout=job.timeout_s)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            job.part.unlink()  # the partial file does not fit the server's file: restart
            raise _Interrupted("the server refused to resume") from error
        if error.code >= 500 or error.code == 429:
            raise _Interrupted(f"HTTP {error.code} {error.reason}") from error
        raise DownloadError(
            f"The server answered HTTP {error.code} {error.reason} for {job.source.url}. {job.manual_hint()}"
        ) from error
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise _Interrupted(_reason(error)) from error


def _reason(error: BaseException) -> str:
    return str(getattr(error, "reason", None) or error)


def _resumes_at(response: http.client.HTTPResponse, offset: int) -> bool:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return response.status == 206 and match is not None and int(match.group(1)) == offset


def _total_size(response: http.client.HTTPResponse, offset: int) -> int | None:
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _stream(job: _Job, response: BinaryIO, out: BinaryIO, received: int, total: int | None) -> int:
    name = job.source.archive_name
    while True:
        job.check_cancel()
        try:
            chunk = response.read(CHUNK_BYTES)
        except (http.client.HTTPException, OSError) as error:
            raise _Interrupted(_reason(error)) from error
        if not chunk:
            return received
        out.write(chunk)
        received += len(chunk)
        if total:
            stage = f"Downloading {name}: {received / MB:.1f} of {total / MB:.1f} MB"
            job.report(DOWNLOAD_END * received / total, stage)
        else:
            job.report(0.0, f"Downloading {name}: {received / MB:.1f} MB")


def _verify_archive(job: _Job, expected: ExpectedArchive) -> None:
    """Size, then checksum; a mismatching file is deleted so that it is never used nor resumed."""
    actual_size = _part_size(job.part)
    if expected.size_bytes is not None and actual_size != expected.size_bytes:
        _reject(job, f"its size is {actual_size} bytes, the published size is {expected.size_bytes}")
    job.report(DOWNLOAD_END, f"Verifying {job.source.archive_name}")
    digests = _digests(job.part, [name for name in ("sha256", "md5") if getattr(expected, name)])
    for algorithm, actual in digests.items():
        if actual != getattr(expected, algorithm).lower():
            _reject(job, f"its {algorithm} is {actual}, the published one is {getattr(expected, algorithm)}")
    job.report(VERIFY_END, f"Verified {job.source.archive_name}")


def _reject(job: _Job, why: str) -> None:
    job.part.unlink()
    raise ChecksumMismatchError(
        f"The downloaded {job.source.archive_name} is corrupt or not the published file: {why}. It was deleted; "
        f"run the download again. If this keeps happening: {job.manual_hint()}"
    )


def _digests(path: Path, algorithms: list[str]) -> dict[str, str]:
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
            for hasher in hashers.values():
                hasher.update(block)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _install(job: _Job) -> None:
    """Extract into a staging folder next to the target, validate, then swap it in with renames."""
    job.target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{job.source.name}-", dir=job.target.parent))
    try:
        extract_archive(job.part, staging, job.report, job.check_cancel)
        try:
            root = find_model_root(staging)
            validate_model_root(root)
        except ModelLayoutError as error:
            raise UnusableArchiveError(f"The downloaded archive does not hold a complete model: {error}") from error
        _replace_dir(root, job.target)
    except OSError as error:
        raise DownloadError(
            f"Could not write the model into {job.target.parent} ({error}). Free disk space or choose another cache "
            f"folder (${CACHE_ENV_VAR} or the Slicer setting), then run the download again."
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    old = target.with_name(f"{STAGING_PREFIX}{target.name}-old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def extract_archive(
    archive: Path,
    destination: Path,
    report: Callable[[float, str], None] = lambda fraction, stage: None,
    check_cancel: Callable[[], None] = lambda: None,
) -> None:
    """Extract a zip or tar archive after checking every entry stays inside `destination`."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zip_file:
            entries = [_zip_entry(destination, info) for info in zip_file.infolist()]
            _write_entries(entries, zip_file.open, report, check_cancel)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tar_file:
            entries = [_tar_entry(destination, member) for member in tar_file.getmembers()]
            _write_entries(entries, tar_file.extractfile, report, check_cancel)
    else:
        raise UnusableArchiveError(f"{archive} is neither a zip nor a tar archive, so it holds no model.")


@dataclass(frozen=True)
class _Entry:
    member: object
    path: Path
    is_dir: bool
    size: int


def _zip_entry(destination: Path, info: zipfile.ZipInfo) -> _Entry:
    if stat.S_ISLNK(info.external_attr >> 16):
        raise _unsafe(info.filename, "is a symbolic link")
    return _Entry(info, _safe_path(destination, info.filename), info.is_dir(), info.file_size)


def _tar_entry(destination: Path, member: tarfile.TarInfo) -> _Entry:
    if member.issym() or member.islnk():
        raise _unsafe(member.name, f"is a link to '{member.linkname}'")
    if not (member.isfile() or member.isdir()):
        raise _unsafe(member.name, "is a device, pipe or other special file")
    return _Entry(member, _safe_path(destination, member.name), member.isdir(), member.size)


def _safe_path(destination: Path, name: str) -> Path:
    posix = name.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) or ".." in parts:
        raise _unsafe(name, "would be written outside the model folder")
    path = destination.joinpath(*parts)
    resolved_destination = destination.resolve()
    if resolved_destination not in path.resolve().parents and path.resolve() != resolved_destination:
        raise _unsafe(name, "would be written outside the model folder")
    return path


def _unsafe(name: str, why: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"The archive was rejected and nothing was installed: its entry '{name}' {why}. Model archives hold only "
        "files and folders; download the model from its official source."
    )


def _write_entries(
    entries: list[_Entry],
    open_member: Callable[[object], BinaryIO],
    report: Callable[[float, str], None],
    check_cancel: Callable[[], None],
) -> None:
    total = sum(entry.size for entry in entries) or 1
    written = 0
    for entry in entries:
        check_cancel()
        if entry.is_dir:
            entry.path.mkdir(parents=True, exist_ok=True)
            continue
        entry.path.parent.mkdir(parents=True, exist_ok=True)
        with open_member(entry.member) as source, open(entry.path, "wb") as target:
            shutil.copyfileobj(source, target, CHUNK_BYTES)
        written += entry.size
        report(VERIFY_END + (EXTRACT_END - VERIFY_END) * written / total, f"Extracting {entry.path.name}")
