"""Plans-driven preprocessing, reusing nnU-Net v2's normalization and resampling functions.

Pipeline (nnU-Net's DefaultPreprocessor order): crop to the non-zero bounding box, normalize, resample to the
plans spacing. The official code runs it on the whole image, which dominates time and memory on large CTs.

`roi` mode computes only a window of the same resampled grid: nnU-Net's resampling (skimage `resize` = scipy
`zoom` with grid_mode, or torch `interpolate`) maps output voxel i to input coordinate (i + 0.5) * in/out - 0.5,
so the window is the same spline interpolation evaluated at the same coordinates, on a crop with enough context
that the spline prefilter sees what it sees on the whole image. Whole-image statistics that the resampling uses
(clipping range, z-score mean/std) are taken from the whole image, which costs one cheap pass.
All arrays are (z, y, x); spacings are (z, y, x) in mm here, as nnU-Net uses them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask
from nnunetv2.preprocessing.normalization import default_normalization_schemes as norm_schemes
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, determine_do_sep_z_and_axis
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from scipy import ndimage

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
# Input voxels of context around a window, so the cubic spline prefilter (decaying ~0.27 per voxel) matches.
SPLINE_CONTEXT_VOXELS = 12
# ... and for linear interpolation (it reads 1 voxel; the rest is slack).
LINEAR_CONTEXT_VOXELS = 3


def nonzero_bounding_box(array_zyx: np.ndarray) -> Region:
    """Bounding box of the non-zero voxels: nnU-Net's crop_to_nonzero box (its hole filling never changes it)."""
    whole = tuple(slice(0, n) for n in array_zyx.shape)
    # a non-zero voxel on each of the six faces spans the whole image (most CTs: air is -1000): no volume scan
    if all(np.any(array_zyx[whole[:axis] + (end,)] != 0) for axis in range(3) for end in (0, -1)):
        return whole
    nonzero_zyx = array_zyx != 0
    box = []
    for axis in range(3):
        other_axes = tuple(a for a in range(3) if a != axis)
        nonzero = np.flatnonzero(np.any(nonzero_zyx, axis=other_axes))
        box.append(slice(int(nonzero[0]), int(nonzero[-1]) + 1) if nonzero.size else slice(0, array_zyx.shape[axis]))
    return tuple(box)


def region_shape(region: Region) -> tuple[int, int, int]:
    return tuple(int(s.stop - s.start) for s in region)


def centred_region(centre_zyx, half_extent_zyx, shape_zyx) -> Region:
    """Voxels within `half_extent` of `centre` (+1 on the upper side), shifted to stay inside the image where it is
    large enough (so a patch clamped at the border sees the same voxels as on the whole image), then clipped."""
    centre, half, shape = np.asarray(centre_zyx, float), np.asarray(half_extent_zyx, float), np.asarray(shape_zyx)
    start = np.floor(centre - half).astype(int)
    stop = np.ceil(centre + half).astype(int) + 1
    shift = np.maximum(0, -start) - np.maximum(0, stop - shape)
    start, stop = np.clip(start + shift, 0, shape), np.clip(stop + shift, 0, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def full_region(shape_zyx) -> Region:
    return tuple(slice(0, int(s)) for s in shape_zyx)


@dataclass(frozen=True)
class Interpolation:
    """How a plans resampling function interpolates: spline order in-plane, along the separate (anisotropic)
    axis, and which axis that is (None: all axes together)."""

    order: int
    order_separate: int
    separate_axis: int | None


@dataclass
class PreprocessedImage:
    """A window `grid_region` of the normalized, resampled image grid, and how it maps to the original voxels.

    The full grid is the non-zero crop `nonzero_region` of the original image resampled to `grid_shape_zyx`
    (nnU-Net's preprocessed image). In exact mode the window is the whole grid."""

    data: np.ndarray  # float32 (1, z, y, x): the window
    nonzero_region: Region  # original voxels that the full grid covers
    grid_shape_zyx: tuple[int, int, int]
    grid_region: Region  # the window within the full grid
    original_spacing_zyx: tuple[float, float, float]
    target_spacing_zyx: tuple[float, float, float]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[1:])

    @property
    def nonzero_shape_zyx(self) -> tuple[int, int, int]:
        return region_shape(self.nonzero_region)

    @property
    def scale_zyx(self) -> np.ndarray:
        """Grid voxels per original voxel, per axis (nnU-Net maps prompts with this ratio of shapes)."""
        return np.asarray(self.grid_shape_zyx, float) / np.asarray(self.nonzero_shape_zyx, float)

    @property
    def nonzero_start_zyx(self) -> np.ndarray:
        return np.asarray([s.start for s in self.nonzero_region], float)

    @property
    def window_start_zyx(self) -> np.ndarray:
        return np.asarray([s.start for s in self.grid_region], int)

    def original_region_covered(self) -> Region:
        """Original voxels whose linear back-resampling reads only voxels of this window (one voxel of slack);
        the whole non-zero crop in exact mode."""
        ratio = 1.0 / self.scale_zyx
        region = []
        for g, r, n, full in zip(self.grid_region, ratio, self.nonzero_region, self.grid_shape_zyx):
            lo = int(np.ceil((g.start + 1.5) * r - 0.5)) if g.start > 0 else 0
            hi = int(np.floor((g.stop - 1.5) * r - 0.5)) + 1 if g.stop < full else n.stop - n.start
            region.append(slice(n.start + lo, n.start + max(lo, hi)))
        return tuple(region)


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

    @property
    def _masked_zscore(self) -> bool:
        """z-score inside nnU-Net's non-zero mask (its usual MR setting): statistics inside, 0 outside."""
        normalizer = self._normalizers[0]
        return isinstance(normalizer, norm_schemes.ZScoreNormalization) and bool(normalizer.use_mask_for_norm)

    def normalize_crop(self, cropped_zyx: np.ndarray) -> np.ndarray:
        """The non-zero crop normalized as nnU-Net's preprocessor does it, with its mask (seg -1 outside the
        hole-filled non-zero region) for a masked z-score."""
        if not self._masked_zscore:
            return self.normalize(cropped_zyx)
        seg = np.where(create_nonzero_mask(cropped_zyx[None]), 0, -1)
        return self._normalizers[0].run(np.array(cropped_zyx, dtype=np.float32), seg)

    def resampled_shape(self, shape_zyx, spacing_zyx) -> tuple[int, int, int]:
        return tuple(int(s) for s in compute_new_shape(shape_zyx, spacing_zyx, self.target_spacing_zyx))

    # --- whole image (exact) -------------------------------------------------------------------------------
    def preprocess(self, image: ImageVolume) -> PreprocessedImage:
        """The official pipeline on the whole image: crop to non-zero, normalize, resample."""
        crop = nonzero_bounding_box(image.array)
        normalized = self.normalize_crop(image.array[crop])[None]
        spacing = image.spacing_zyx
        grid_shape = self.resampled_shape(normalized.shape[1:], spacing)
        data = self.configuration.resampling_fn_data(normalized, grid_shape, spacing, self.target_spacing_zyx)
        return PreprocessedImage(np.asarray(data, dtype=np.float32), crop, grid_shape, full_region(grid_shape), spacing,
                                 self.target_spacing_zyx)

    def resample_segmentation(self, labels_zyx: np.ndarray, spacing_zyx, new_shape) -> np.ndarray:
        """Label map to preprocessed space with the plans' segmentation resampling (ids kept, e.g. > 255)."""
        labels = np.asarray(labels_zyx)
        resampled = self.configuration.resampling_fn_seg(labels[None].astype(np.int32), new_shape, spacing_zyx,
                                                         self.target_spacing_zyx)
        return np.asarray(resampled[0]).astype(labels.dtype if labels.dtype.kind in "iu" else np.int32)

    def logits_to_original(self, logits_czyx: np.ndarray, pre: PreprocessedImage) -> np.ndarray:
        """Resample whole-grid logits back onto the original voxels of the non-zero crop (exact mode)."""
        return self.resample_logits(logits_czyx, pre.nonzero_shape_zyx, pre.original_spacing_zyx)

    def resample_logits(self, logits_czyx: np.ndarray, shape_zyx, original_spacing_zyx) -> np.ndarray:
        """Logits on the model's grid -> `shape_zyx` voxels of `original_spacing_zyx` (the plans' probability
        resampling)."""
        return np.asarray(
            self.configuration.resampling_fn_probabilities(
                logits_czyx, shape_zyx, self.target_spacing_zyx, original_spacing_zyx
            ),
            dtype=np.float32,
        )

    # --- windows of the grid (roi) --------------------------------------------------------------------------
    def interpolation(self, function_name: str, kwargs: dict, current_spacing, new_spacing) -> Interpolation:
        if function_name == "resample_data_or_seg_to_shape":
            force = kwargs.get("force_separate_z", False)
            order, order_separate = int(kwargs.get("order", 3)), int(kwargs.get("order_z", 0))
        elif function_name == "resample_torch_fornnunet":
            force = kwargs.get("force_separate_z", None)
            order, order_separate = 1, 0  # (bi/tri)linear, then nearest along the anisotropic axis
        else:
            raise CheckpointError(f"roi mode does not know the resampling function '{function_name}'; use mode 'exact'.")
        separate, axis = determine_do_sep_z_and_axis(force, current_spacing, new_spacing)
        return Interpolation(order, order_separate, axis if separate else None)

    def preprocess_window(self, image: ImageVolume, original_region: Region) -> PreprocessedImage:
        """The window of the whole-image preprocessed grid that covers `original_region` (original voxels)."""
        nonzero = nonzero_bounding_box(image.array)
        spacing = image.spacing_zyx
        nonzero_shape = region_shape(nonzero)
        grid_shape = self.resampled_shape(nonzero_shape, spacing)
        scale = np.asarray(grid_shape, float) / np.asarray(nonzero_shape, float)
        window = tuple(
            slice(max(0, int(np.floor((r.start - n.start) * k))), max(1, min(g, int(np.ceil((r.stop - n.start) * k)))))
            for r, n, k, g in zip(original_region, nonzero, scale, grid_shape)
        )
        window = tuple(slice(min(w.start, w.stop - 1), w.stop) for w in window)
        config = self.configuration.configuration
        interpolation = self.interpolation(config["resampling_fn_data"], config["resampling_fn_data_kwargs"],
                                           spacing, self.target_spacing_zyx)
        crop = _context_crop(window, 1.0 / scale, nonzero_shape)
        absolute_crop = tuple(slice(n.start + c.start, n.start + c.stop) for n, c in zip(nonzero, crop))
        whole = image.array[nonzero]
        if self._masked_zscore:  # 0 outside the filled mask is not a monotonic map of the raw values: whole crop
            normalized_whole = self.normalize_crop(whole)
            normalized = normalized_whole[crop]
            clip_lo, clip_hi = self._clip_ranges(normalized_whole, crop, interpolation, normalized=True)
        else:
            normalized = self._normalize_values(image.array[absolute_crop], whole)
            clip_lo, clip_hi = self._clip_ranges(whole, crop, interpolation)
        data = resample_window(normalized, [c.start for c in crop], nonzero_shape, grid_shape, window, interpolation,
                               clip_lo, clip_hi)
        return PreprocessedImage(data[None].astype(np.float32), nonzero, grid_shape, window, spacing,
                                 self.target_spacing_zyx)

    def _normalize_values(self, values: np.ndarray, whole: np.ndarray) -> np.ndarray:
        """Normalize `values` as they would be normalized inside the whole non-zero-cropped image `whole`."""
        normalizer = self._normalizers[0]
        if isinstance(normalizer, norm_schemes.RescaleTo01Normalization):
            raise CheckpointError("roi mode does not support RescaleTo01Normalization plans; use mode 'exact'.")
        if isinstance(normalizer, norm_schemes.ZScoreNormalization):
            # z-score uses the statistics of the whole image, not of the window (without a mask)
            mean, std = float(whole.mean(dtype=np.float64)), float(whole.std(dtype=np.float64))
            return ((values.astype(np.float32) - mean) / max(std, 1e-8)).astype(np.float32)
        return self.normalize(values)

    def _clip_ranges(self, whole: np.ndarray, crop: Region, interpolation: Interpolation, normalized: bool = False):
        """skimage clips a spline's output to its input's range: the whole image's, or each whole 2D slice's when
        the anisotropic axis is resampled separately. Normalization is monotonic: normalize the raw extremes
        (unless `whole` is `normalized` already)."""
        if interpolation.order <= 1:
            return None, None
        axis = interpolation.separate_axis
        if axis is None:
            extremes = np.array([[whole.min()], [whole.max()]])
        else:
            others = tuple(a for a in range(3) if a != axis)
            rows = whole[tuple(crop[axis] if a == axis else slice(None) for a in range(3))]  # a view, no copy
            extremes = np.stack([rows.min(axis=others), rows.max(axis=others)])
        if not normalized:
            extremes = self._normalize_values(extremes.reshape(1, 2, -1), whole).reshape(extremes.shape)
        return extremes[0], extremes[1]

    def resample_mask_window(self, mask_zyx: np.ndarray, pre: PreprocessedImage) -> np.ndarray:
        """A binary original-space mask on the window, as nnU-Net's segmentation resampling makes it: each label's
        indicator interpolated, the larger wins, exact ties go to the nearest original voxel."""
        config = self.configuration.configuration
        interpolation = self.interpolation(config["resampling_fn_seg"], config["resampling_fn_seg_kwargs"],
                                           pre.original_spacing_zyx, pre.target_spacing_zyx)
        crop = _context_crop(pre.grid_region, 1.0 / pre.scale_zyx, pre.nonzero_shape_zyx)
        absolute = tuple(slice(n.start + c.start, n.start + c.stop) for n, c in zip(pre.nonzero_region, crop))
        inside = np.asarray(mask_zyx[absolute] > 0, dtype=np.float64)

        def resample(values: np.ndarray, order: int) -> np.ndarray:
            linear = Interpolation(min(order, 1), interpolation.order_separate, interpolation.separate_axis)
            return resample_window(values, [c.start for c in crop], pre.nonzero_shape_zyx, pre.grid_shape_zyx,
                                   pre.grid_region, linear, None, None)

        foreground, background = resample(inside, interpolation.order), resample(1.0 - inside, interpolation.order)
        nearest = resample(inside, 0) > 0.5
        return np.where(foreground == background, nearest, foreground > background)

    def probability_interpolation(self, pre: PreprocessedImage) -> Interpolation:
        """How the plans resample logits from the model's grid back to the original spacing."""
        config = self.configuration.configuration
        return self.interpolation(config["resampling_fn_probabilities"], config["resampling_fn_probabilities_kwargs"],
                                  pre.target_spacing_zyx, pre.original_spacing_zyx)

    def window_to_original(self, difference_zyx: np.ndarray, pre: PreprocessedImage) -> tuple[np.ndarray, Region]:
        """Resample a window of logits back to the original voxels it alone determines; returns (values, region)."""
        interpolation = self.probability_interpolation(pre)
        region = pre.original_region_covered()
        local = tuple(slice(r.start - n.start, r.stop - n.start) for r, n in zip(region, pre.nonzero_region))
        values = resample_window(difference_zyx.astype(np.float64), pre.window_start_zyx, pre.grid_shape_zyx,
                                 pre.nonzero_shape_zyx, local, interpolation, None, None)
        return values.astype(np.float32), region

    def changed_window_to_original(self, difference_zyx: np.ndarray, pre: PreprocessedImage,
                                   background: float) -> tuple[np.ndarray, Region]:
        """window_to_original of only the part of the window around the values that differ from `background`
        (the patches); elsewhere the logits are that constant, and they resample to it (background)."""
        changed = np.argwhere(difference_zyx != background)
        if not len(changed):
            return self.window_to_original(difference_zyx, pre)
        margin = LINEAR_CONTEXT_VOXELS if self.probability_interpolation(pre).order <= 1 else SPLINE_CONTEXT_VOXELS
        local = tuple(slice(max(0, int(a) - margin), min(int(n), int(b) + 1 + margin))
                      for a, b, n in zip(changed.min(axis=0), changed.max(axis=0), difference_zyx.shape))
        window = tuple(slice(g.start + w.start, g.start + w.stop) for g, w in zip(pre.grid_region, local))
        return self.window_to_original(difference_zyx[local], replace(pre, data=pre.data[(slice(None),) + local],
                                                                     grid_region=window))


def _context_crop(window: Region, ratio, input_shape) -> Region:
    """Input voxels needed to interpolate the output `window` (ratio = input/output voxels), with spline context."""
    crop = []
    for w, r, n in zip(window, ratio, input_shape):
        lo = int(np.floor((w.start + 0.5) * r - 0.5)) - SPLINE_CONTEXT_VOXELS
        hi = int(np.ceil((w.stop - 0.5) * r - 0.5)) + SPLINE_CONTEXT_VOXELS + 1
        crop.append(slice(max(0, lo), min(n, hi)))
    return tuple(crop)


def _axis_coordinates(out_range: range, ratio: float, crop_start: int) -> np.ndarray:
    # the same expression (and so the same rounding) as skimage/scipy zoom: ties at 0.5 then break the same way
    return (np.arange(out_range.start, out_range.stop, dtype=np.float64) + 0.5) * ratio - 0.5 - crop_start


def _sample(data: np.ndarray, axes_coordinates: list[np.ndarray], order: int) -> np.ndarray:
    grid = np.stack(np.meshgrid(*axes_coordinates, indexing="ij"))
    return ndimage.map_coordinates(data, grid, order=order, mode="nearest")


def resample_window(crop_zyx: np.ndarray, crop_start_zyx, full_in_shape, full_out_shape, out_window: Region,
                    interpolation: Interpolation, clip_lo, clip_hi) -> np.ndarray:
    """Values of `full_in -> full_out` resampling inside `out_window`, computed from a crop of the input.

    Output voxel i of an axis samples input coordinate (i + 0.5) * in/out - 0.5 (skimage/torch align_corners=False),
    edges repeated. With a separate anisotropic axis, first the other two axes (order `order`, clipped per slice),
    then that axis (order `order_separate`), as nnU-Net does."""
    ratios = [float(i) / float(o) for i, o in zip(full_in_shape, full_out_shape)]
    data = np.asarray(crop_zyx, dtype=np.float64)
    coordinates = [_axis_coordinates(range(w.start, w.stop), r, int(c))
                   for w, r, c in zip(out_window, ratios, crop_start_zyx)]
    axis = interpolation.separate_axis
    if axis is None:
        out = _sample(data, coordinates, interpolation.order)
        return out if clip_lo is None else np.clip(out, clip_lo, clip_hi)
    # sampling exactly at the knots along `axis` reproduces each slice: a 3D spline here equals nnU-Net's 2D ones
    in_plane_coordinates = list(coordinates)
    in_plane_coordinates[axis] = np.arange(data.shape[axis], dtype=np.float64)
    in_plane = _sample(data, in_plane_coordinates, interpolation.order)
    if clip_lo is not None:
        shape = [1, 1, 1]
        shape[axis] = -1
        in_plane = np.clip(in_plane, np.reshape(clip_lo, shape), np.reshape(clip_hi, shape))
    along = [np.arange(n, dtype=np.float64) for n in in_plane.shape]
    along[axis] = coordinates[axis]
    return _sample(in_plane, along, interpolation.order_separate)
