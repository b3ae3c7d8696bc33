"""Lesion-free background scans (real images from the shared data, or procedural phantoms) and where lesions go.

Sites (lung, liver, soft_tissue, brain, bone) come from a label map when there is one (phantoms, TotalSegmentator
organ maps) and otherwise from intensity ranges of the smoothed image (CT in HU; MR relative to its tissue
intensities). A lesion centre is drawn where the site is at least about the lesion's radius deep.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import LesionLocatorError
from ..image import ImageVolume, read_image
from .lesions import SITES

# label values of phantom label maps (and of organ maps once translated)
LABELS = {"background": 0, "soft_tissue": 1, "fat": 2, "lung": 3, "liver": 4, "bone": 5, "brain": 6, "csf": 7}
CT_SITE_RANGES_HU = {"lung": (-950.0, -500.0), "soft_tissue": (-20.0, 100.0), "bone": (250.0, 3000.0), "brain": (5.0, 65.0)}
TOTALSEGMENTATOR_SITES = {5: "liver"}  # TotalSegmentator v2 class 5 = liver


@dataclass(frozen=True)
class BackgroundSource:
    path: str  # relative to the shared data folder
    modality: str
    body_region: str  # "body" or "head"
    organ_map: str | None = None
    organ_sites: dict[int, str] | None = None


REAL_BACKGROUNDS = {
    "abdomen_ct": BackgroundSource("totalsegmentator_examples/example_ct.nii.gz", "CT", "body",
                                   "totalsegmentator_examples/example_seg.nii.gz", TOTALSEGMENTATOR_SITES),
    "chest_ct_dicom": BackgroundSource("totalsegmentator_examples/example_ct_dicom", "CT", "body",
                                       "totalsegmentator_examples/example_seg_dicom.nii.gz", TOTALSEGMENTATOR_SITES),
    "cranium_ct": BackgroundSource("head_ct/cranium_ct.nii.gz", "CT", "head"),
    "brain_atlas_ct": BackgroundSource("head_ct/ct_brain_atlas_1mm.nii.gz", "CT", "head"),
    "abdomen_mr": BackgroundSource("totalsegmentator_examples/example_mr_sm.nii.gz", "MR", "body"),
    **{
        f"ms_flair_{patient}": BackgroundSource(f"open_ms_longitudinal/raw/patient{patient}/study1_FLAIR.nii.gz",
                                                "MR", "head")
        for patient in ("01", "03", "12", "19")
    },
}


def default_data_root() -> Path:
    """The shared data folder: $LESIONLOCATOR_SHARED_DATA, else `../shared/data` next to the repository."""
    configured = os.environ.get("LESIONLOCATOR_SHARED_DATA")
    return Path(configured) if configured else Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass
class Background:
    """A lesion-free scan plus where lesions may be placed."""

    name: str
    image: ImageVolume  # float32 intensities (HU for CT)
    modality: str  # "CT" or "MR"
    body_region: str  # "body" or "head"
    site_labels: np.ndarray | None = None  # LABELS values on the image grid, if known
    labels_complete: bool = False  # True: every site comes from site_labels (phantoms), none from intensities
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"Background modality must be 'CT' or 'MR'; got '{self.modality}'.")
        self.image = self.image.with_array(np.asarray(self.image.array, dtype=np.float32))

    @property
    def outside_value(self) -> float:
        """Intensity of 'nothing' (air for CT, 0 for MR), used outside the scanned field of view."""
        return -1000.0 if self.modality == "CT" else 0.0

    def smoothed(self) -> np.ndarray:
        if "smoothed" not in self._cache:
            self._cache["smoothed"] = ndimage.gaussian_filter(self.image.array, 1.0)
        return self._cache["smoothed"]

    def site_mask(self, site: str) -> np.ndarray:
        if site not in SITES:
            raise ValueError(f"Unknown site '{site}'; use one of {SITES}.")
        key = ("mask", site)
        if key not in self._cache:
            self._cache[key] = self._compute_site_mask(site)
        return self._cache[key]

    def available_sites(self, min_volume_ml: float = 5.0) -> list[str]:
        voxel_ml = float(np.prod(self.image.spacing_xyz)) / 1000.0
        return [site for site in SITES if self.site_mask(site).sum() * voxel_ml >= min_volume_ml]

    def site_depth_mm(self, site: str) -> np.ndarray:
        """Distance (mm) from each site voxel to the nearest non-site voxel."""
        key = ("depth", site)
        if key not in self._cache:
            self._cache[key] = ndimage.distance_transform_edt(self.site_mask(site), sampling=self.image.spacing_zyx)
        return self._cache[key]

    def noise_std(self) -> float:
        """Robust standard deviation of the image noise in soft tissue (or tissue for MR)."""
        if "noise" not in self._cache:
            tissue = self.site_mask("brain" if self.body_region == "head" else "soft_tissue")
            residual = (self.image.array - ndimage.gaussian_filter(self.image.array, 1.0))[tissue]
            mad = float(np.median(np.abs(residual - np.median(residual)))) if residual.size else 0.0
            self._cache["noise"] = 1.4826 * mad
        return self._cache["noise"]

    def _compute_site_mask(self, site: str) -> np.ndarray:
        if self.site_labels is not None and (site in LABELS) and np.any(self.site_labels == LABELS[site]):
            return self.site_labels == LABELS[site]
        if self.labels_complete:
            return np.zeros(self.image.shape_zyx, bool)
        smooth = self.smoothed()
        if self.modality == "MR":
            return self._mr_site_mask(site, smooth)
        # from intensities: the liver needs a label map; brain exists only in heads, lungs only in bodies
        head = self.body_region == "head"
        if site == "liver" or (site == "brain" and not head) or (site == "lung" and head):
            return np.zeros(self.image.shape_zyx, bool)
        low, high = CT_SITE_RANGES_HU[site]
        mask = ndimage.binary_opening((smooth >= low) & (smooth <= high), iterations=1)
        return largest_component(mask) if site == "brain" else mask

    def _mr_site_mask(self, site: str, smooth: np.ndarray) -> np.ndarray:
        wanted = "brain" if self.body_region == "head" else "soft_tissue"
        if site != wanted:
            return np.zeros(self.image.shape_zyx, bool)
        foreground = smooth > np.percentile(smooth, 60)
        low, high = np.percentile(smooth[foreground], [20, 95])
        return largest_component(ndimage.binary_opening((smooth >= low) & (smooth <= high), iterations=1))

    def local_value(self, center_lps: np.ndarray, radius_mm: float, site: str) -> float:
        """Median intensity of the site within `radius_mm` (+ 3 mm) of a point: the lesion's surroundings."""
        index = np.round(self.image.lps_to_index_zyx(center_lps)).astype(int)
        reach = np.ceil((radius_mm + 3.0) / np.asarray(self.image.spacing_zyx)).astype(int)
        region = tuple(slice(max(i - r, 0), i + r + 1) for i, r in zip(index, reach))
        values = self.image.array[region][self.site_mask(site)[region]]
        if values.size == 0:
            values = self.image.array[region]
        return float(np.median(values))


def largest_component(mask: np.ndarray) -> np.ndarray:
    if not np.any(mask):
        return mask
    labels = cc3d.connected_components(mask.astype(np.uint8), connectivity=6)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def choose_lesion_center(background: Background, site: str, radius_mm: float, rng: np.random.Generator,
                         taken: list[tuple[np.ndarray, float]] = (), attempts: int = 4000) -> np.ndarray | None:
    """A centre (LPS) inside `site`, deep enough for the lesion where the site allows it, away from the image
    border and from `taken` lesions (centre, extent mm). None when the site has no room."""
    depth = background.site_depth_mm(site)
    if not np.any(depth > 0):
        return None
    required = min(0.8 * radius_mm, 0.8 * float(depth.max()))
    candidates = np.flatnonzero(depth.ravel() >= max(required, 1e-6))
    if candidates.size == 0:
        return None
    image = background.image
    border = np.minimum(np.ceil(radius_mm / np.asarray(image.spacing_zyx)).astype(int), np.asarray(image.shape_zyx) // 2 - 1)
    for flat in rng.choice(candidates, size=min(attempts, candidates.size), replace=False):
        index = np.array(np.unravel_index(flat, image.shape_zyx))
        if np.any(index < border) or np.any(index >= np.asarray(image.shape_zyx) - border):
            continue
        center = image.index_zyx_to_lps(index + rng.uniform(-0.5, 0.5, size=3))
        if all(np.linalg.norm(center - other) >= radius_mm + extent + 3.0 for other, extent in taken):
            return center
    return None


def _organ_labels(source: BackgroundSource, image: ImageVolume, data_root: Path) -> np.ndarray | None:
    if source.organ_map is None or not (data_root / source.organ_map).exists():
        return None
    reference = image.to_sitk(np.zeros(image.shape_zyx, np.uint8))
    organs = sitk.Resample(sitk.ReadImage(str(data_root / source.organ_map)), reference, sitk.Transform(),
                           sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    organ_array = sitk.GetArrayFromImage(organs)
    labels = np.zeros(image.shape_zyx, np.uint8)
    for organ, site in (source.organ_sites or {}).items():
        labels[organ_array == organ] = LABELS[site]
    return labels if np.any(labels) else None


class BackgroundError(LesionLocatorError, ValueError):
    """A background name that names no scan and no phantom."""


class BackgroundNotFoundError(LesionLocatorError, FileNotFoundError):
    """A real background whose scan is not in the shared data folder."""


PHANTOM_KINDS = ("body_phantom", "head_phantom")


def check_background_name(name: str) -> None:
    """Fail fast, before minutes of samples, on a name that `load_background` would not know."""
    kind, colon, seed = name.partition(":")
    if kind in PHANTOM_KINDS:
        if colon and not seed.isdigit():
            raise BackgroundError(f"Background '{name}': a phantom's seed must be a whole number, e.g. {kind}:7.")
        return
    if name not in REAL_BACKGROUNDS:
        raise BackgroundError(f"Unknown background '{name}'; use one of {sorted(REAL_BACKGROUNDS)} or "
                              "body_phantom:<seed>, head_phantom:<seed>.")


def load_background(name: str, data_root: str | Path | None = None) -> Background:
    """A named background: a real scan from REAL_BACKGROUNDS, or 'body_phantom:<seed>' / 'head_phantom:<seed>'."""
    from .phantoms import make_phantom  # phantoms import this module

    check_background_name(name)
    kind, _, seed = name.partition(":")
    if kind in PHANTOM_KINDS:
        return make_phantom(kind, np.random.default_rng(int(seed or 0)), name=name)
    source = REAL_BACKGROUNDS[name]
    root = Path(data_root) if data_root is not None else default_data_root()
    path = root / source.path
    if not path.exists():
        raise BackgroundNotFoundError(f"Background '{name}' needs {path}; set LESIONLOCATOR_SHARED_DATA to the shared "
                                      "data folder or use a phantom background.")
    image = read_image(path)
    image = image.with_array(image.array.astype(np.float32), name=name)
    labels = _organ_labels(source, image, root)
    return Background(name, image, source.modality, source.body_region, site_labels=labels)
