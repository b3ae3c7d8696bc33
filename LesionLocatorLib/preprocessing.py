"""Plans-driven preprocessing, reusing nnU-Net v2's normalization and resampling functions.

Pipeline (nnU-Net's DefaultPreprocessor order): crop to the non-zero bounding box, normalize, resample to the
plans spacing. `preprocess_region` runs it on a sub-region of the image only (the `roi` mode): the official code
always runs it on the whole image, which dominates time and memory on large CTs.
All arrays are (z, y, x); spacings are (z, y, x) in mm here, as nnU-Net uses them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from nnunetv2.preprocessing.normalization import default_normalization_schemes as norm_schemes
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from .checkpoint import ModelFolder
from .errors import CheckpointError
from .image import ImageVolume

Region = tuple[slice, slice, slice]

_NORMALIZATIONS = {
    cls.__name__: cls
    for cls in (
        norm_schemes.CTNormalization,
        norm_schemes.ZScoreNormalization,
        norm_schemes.NoNormalization,
        norm_schemes.RescaleTo01Normalization,
    )
}


def nonzero_bounding_box(array_zyx: np.ndarray) -> Region:
    """Bounding box of the non-zero voxels: nnU-Net's crop_to_nonzero box (its hole filling never changes it)."""
    box = []
    for axis in range(3):
        other_axes = tuple(a for a in range(3) if a != axis)
        nonzero = np.flatnonzero(np.any(array_zyx != 0, axis=other_axes))
        box.append(slice(int(nonzero[0]), int(nonzero[-1]) + 1) if nonzero.size else slice(0, array_zyx.shape[axis]))
    return tuple(box)


def intersect_regions(a: Region, b: Region) -> Region:
    return tuple(slice(max(x.start, y.start), max(max(x.start, y.start), min(x.stop, y.stop))) for x, y in zip(a, b))


def region_shape(region: Region) -> tuple[int, int, int]:
    return tuple(int(s.stop - s.start) for s in region)


@dataclass
class PreprocessedImage:
    """A normalized, resampled (part of an) image and how it maps back to the original voxels."""

    data: np.ndarray  # float32 (1, z, y, x)
    region: Region  # the original-image voxels it was made from (after cropping to non-zero)
    original_spacing_zyx: tuple[float, float, float]
    target_spacing_zyx: tuple[float, float, float]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[1:])

    @property
    def region_shape_zyx(self) -> tuple[int, int, int]:
        return region_shape(self.region)

    @property
    def scale_zyx(self) -> np.ndarray:
        """Preprocessed voxels per original voxel, per axis (nnU-Net maps prompts with this ratio of shapes)."""
        return np.asarray(self.shape_zyx, float) / np.asarray(self.region_shape_zyx, float)

    @property
    def region_start_zyx(self) -> np.ndarray:
        return np.asarray([s.start for s in self.region], float)


class Preprocessor:
    """Normalization and resampling exactly as a model folder's plans specify them."""

    def __init__(self, model: ModelFolder):
        self.model = model
        plans_manager = PlansManager(model.plans)
        try:
            self.configuration: ConfigurationManager = plans_manager.get_configuration(model.configuration_name)
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(f"{model.path / 'plans.json'}: {error}") from error

    @cached_property
    def _normalizers(self) -> list:
        normalizers = []
        for channel, scheme in enumerate(self.configuration.normalization_schemes):
            if scheme not in _NORMALIZATIONS:
                raise CheckpointError(f"Unsupported normalization '{scheme}' in plans.json (have {sorted(_NORMALIZATIONS)}).")
            normalizers.append(
                _NORMALIZATIONS[scheme](
                    use_mask_for_norm=self.configuration.use_mask_for_norm[channel],
                    intensityproperties=self.model.intensity_properties.get(str(channel)),
                )
            )
        return normalizers

    @property
    def target_spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.configuration.spacing)

    def normalize(self, array_zyx: np.ndarray) -> np.ndarray:
        """Channel-0 normalization of a (z, y, x) array; returns float32."""
        return self._normalizers[0].run(np.array(array_zyx, dtype=np.float32), None)

    def resampled_shape(self, shape_zyx, spacing_zyx) -> tuple[int, int, int]:
        return tuple(int(s) for s in compute_new_shape(shape_zyx, spacing_zyx, self.target_spacing_zyx))

    def preprocess(self, image: ImageVolume, region: Region | None = None) -> PreprocessedImage:
        """Crop to non-zero (and to `region` if given), normalize, resample to the plans spacing."""
        crop = nonzero_bounding_box(image.array)
        if region is not None:
            crop = intersect_regions(crop, region)
            if min(region_shape(crop)) == 0:
                raise ValueError("The requested region holds no non-zero voxels of the image.")
        normalized = self.normalize(image.array[crop])[None]
        spacing = image.spacing_zyx
        new_shape = self.resampled_shape(normalized.shape[1:], spacing)
        data = self.configuration.resampling_fn_data(normalized, new_shape, spacing, self.target_spacing_zyx)
        return PreprocessedImage(np.asarray(data, dtype=np.float32), crop, spacing, self.target_spacing_zyx)

    def resample_segmentation(self, labels_zyx: np.ndarray, spacing_zyx, new_shape) -> np.ndarray:
        """Label map to preprocessed space with the plans' segmentation resampling (ids kept, e.g. > 255)."""
        labels = np.asarray(labels_zyx)
        resampled = self.configuration.resampling_fn_seg(labels[None].astype(np.int32), new_shape, spacing_zyx,
                                                         self.target_spacing_zyx)
        return np.asarray(resampled[0]).astype(labels.dtype if labels.dtype.kind in "iu" else np.int32)

    def logits_to_original(self, logits_czyx: np.ndarray, pre: PreprocessedImage) -> np.ndarray:
        """Resample preprocessed-space logits back onto the original voxels of `pre.region`."""
        return np.asarray(
            self.configuration.resampling_fn_probabilities(
                logits_czyx, pre.region_shape_zyx, pre.target_spacing_zyx, pre.original_spacing_zyx
            ),
            dtype=np.float32,
        )
