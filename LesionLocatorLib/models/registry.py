"""The models LesionLocator knows: the bundled Lite model, the official checkpoint, and any local folder.

`model_root(name_or_folder)` is the one call the rest of the engine needs: it returns the folder to pass as the
model root (the folder that holds `LesionLocatorSeg/` and/or `LesionLocatorTrack/`), or raises an error that says
how to get the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LesionLocatorError
from .cache import installed_model_dir, user_cache_dir
from .layout import ModelLayout, ModelLayoutError, find_model_root, validate_model_root

BUNDLED = "bundled"
DOWNLOAD = "download"
LOCAL = "local"

BUNDLED_LITE_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "LesionLocatorLite"
ZENODO_RECORD = "https://zenodo.org/records/15174217"


class UnknownModelError(LesionLocatorError):
    """A model name that is neither registered nor an existing folder."""


class ModelNotInstalledError(LesionLocatorError):
    """A registered model that has not been downloaded (or whose files are gone)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and what the user must know before getting it.

    For downloads, `size_bytes` and the checksums may be left unknown when the server publishes them
    (`metadata_url`, a Zenodo record API): the downloader then reads them from there before downloading.
    """

    name: str
    kind: str
    description: str
    licence: str
    licence_url: str | None = None
    requires_licence_acceptance: bool = False
    path: Path | None = None
    url: str | None = None
    archive_name: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    md5: str | None = None
    metadata_url: str | None = None
    homepage: str | None = None

    @property
    def manual_download_page(self) -> str | None:
        return self.homepage or self.url


LESIONLOCATOR_LITE = ModelSource(
    name="lesionlocator-lite",
    kind=BUNDLED,
    description="LesionLocator Lite: small CPU-friendly model shipped with the extension",
    licence="Apache-2.0 (same as this extension)",
    path=BUNDLED_LITE_DIR,
)

LESIONLOCATOR_OFFICIAL = ModelSource(
    name="lesionlocator",
    kind=DOWNLOAD,
    description="Official LesionLocator checkpoint (CVPR 2025): point/box segmentation and tracking, 5 folds",
    # The record page does not state size, checksum or licence in any copy we could read; Zenodo's record
    # API publishes size, md5 and licence id, so the downloader verifies against those.
    licence=f"licence stated on Zenodo record 15174217 ({ZENODO_RECORD}); read it before accepting",
    licence_url=ZENODO_RECORD,
    requires_licence_acceptance=True,
    url=f"{ZENODO_RECORD}/files/LesionLocatorModel.zip?download=1",
    archive_name="LesionLocatorModel.zip",
    metadata_url="https://zenodo.org/api/records/15174217",
    homepage=ZENODO_RECORD,
)

REGISTRY: dict[str, ModelSource] = {source.name: source for source in (LESIONLOCATOR_LITE, LESIONLOCATOR_OFFICIAL)}
DEFAULT_MODEL = LESIONLOCATOR_LITE.name


@dataclass(frozen=True)
class ModelStatus:
    """A source and whether a usable copy is on disk (`problem` says why not, when it is not)."""

    source: ModelSource
    root: Path | None
    layout: ModelLayout | None
    problem: str | None

    @property
    def installed(self) -> bool:
        return self.layout is not None


def get_source(name: str) -> ModelSource:
    if name not in REGISTRY:
        raise UnknownModelError(
            f"Unknown model '{name}'. Known models: {', '.join(REGISTRY)}; or pass the path of a model folder."
        )
    return REGISTRY[name]


def local_source(folder: str | Path) -> ModelSource:
    folder = Path(folder).expanduser()
    return ModelSource(name=folder.name or str(folder), kind=LOCAL, description=f"local folder {folder}",
                       licence="as provided with the folder", path=folder)


def expected_location(source: ModelSource, cache_dir: str | Path | None = None) -> Path:
    """Where the model root of `source` is, or must be put for a manual install."""
    if source.kind == DOWNLOAD:
        return installed_model_dir(user_cache_dir(cache_dir), source.name)
    return source.path


def model_status(source: ModelSource, cache_dir: str | Path | None = None) -> ModelStatus:
    location = expected_location(source, cache_dir)
    if not location.is_dir():
        return ModelStatus(source, None, None, f"not installed ({location} does not exist)")
    try:
        root = find_model_root(location) if source.kind == LOCAL else location
        return ModelStatus(source, root, validate_model_root(root), None)
    except ModelLayoutError as error:
        return ModelStatus(source, None, None, str(error))


def list_models(cache_dir: str | Path | None = None, local_folders: tuple[str | Path, ...] = ()) -> list[ModelStatus]:
    sources = [*REGISTRY.values(), *(local_source(folder) for folder in local_folders)]
    return [model_status(source, cache_dir) for source in sources]


def model_root(name_or_folder: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The validated model root for a registered name or a local folder."""
    if str(name_or_folder) in REGISTRY:
        return _registered_root(get_source(str(name_or_folder)), cache_dir)
    folder = Path(name_or_folder).expanduser()
    if not folder.is_dir():
        raise UnknownModelError(
            f"'{name_or_folder}' is neither a known model ({', '.join(REGISTRY)}) nor an existing folder."
        )
    root = find_model_root(folder)
    validate_model_root(root)
    return root


def _registered_root(source: ModelSource, cache_dir: str | Path | None) -> Path:
    status = model_status(source, cache_dir)
    if status.installed:
        return status.root
    if source.kind == DOWNLOAD:
        raise ModelNotInstalledError(
            f"Model '{source.name}' is not installed: {status.problem}. "
            f"{download_instructions(source, expected_location(source, cache_dir))}"
        )
    raise ModelNotInstalledError(
        f"The bundled model '{source.name}' is missing or incomplete: {status.problem}. Reinstall the extension."
    )


def download_instructions(source: ModelSource, target: Path) -> str:
    """How to install a downloadable model, with the command and the manual alternative."""
    acceptance = " --accept-licence" if source.requires_licence_acceptance else ""
    return (
        f"Download it with `lesionlocator models download {source.name}{acceptance}` (or from the extension's "
        f"settings), or by hand from {source.manual_download_page}: extract {source.archive_name} and put the "
        f"folder that holds LesionLocatorSeg/ and LesionLocatorTrack/ at {target} (so that "
        f"{target / 'LesionLocatorSeg' / 'point_optimized' / 'plans.json'} exists), or pass the extracted folder "
        "as the model folder."
    )
