"""Classical (optimisation-based) registration with SimpleITK: affine, then diffeomorphic demons.

Everything happens in physical (LPS) space, so voxel spacing, direction and origin of both scans are honoured.
Both images are first brought to a coarse isotropic working grid (default 3 mm), which keeps a registration of two
CT/MR scans to a few CPU seconds. Mattes mutual information makes it work for CT and MR and for intensities that
differ between the scans.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import SimpleITK as sitk

from LesionLocatorLib.image import ImageVolume
from LesionLocatorLib.registration.base import Deformation, Registration, RegistrationError, check_mask_shape

# Fewer voxels than this along an axis of the working image and the metric runs out of samples.
MIN_WORKING_VOXELS = 24
HISTOGRAM_BINS = 32
SAMPLING_SEED = 20250
# Room around a mask's affinely mapped bounding box for what the deformable stage adds.
NEAR_MARGIN_MM = 25.0
# Metric samples per pyramid level of the affine stage (Mattes MI, 32 bins).
MAX_METRIC_SAMPLES = 150_000
# Above this many working voxels (e.g. a whole-body CT at 3 mm) demons runs on a 2x coarser grid.
DEMONS_MAX_VOXELS = 1_500_000


class TransformDeformation(Deformation):
    """A SimpleITK transform mapping fixed (later) LPS points to moving (earlier) LPS points."""

    def __init__(self, transform: sitk.Transform, moving_grid: ImageVolume, fixed_grid: ImageVolume) -> None:
        self.transform = transform
        # the grids only: a cached deformation must not keep two whole scans alive
        self._moving_grid = geometry_only(moving_grid)
        self._fixed_grid = geometry_only(fixed_grid)

    def warp_mask(self, mask_on_moving: np.ndarray) -> np.ndarray:
        mask = check_mask_shape(mask_on_moving, self._moving_grid.shape_zyx)
        return self._warped_onto(mask, np.zeros(3), self._fixed_grid.shape_zyx)

    def warp_mask_near(self, mask_on_moving: np.ndarray, margin_mm: float = NEAR_MARGIN_MM):
        """Warp onto the fixed-grid box around where the mask's bounding box maps (plus a margin for the
        deformable part), not the whole scan; falls back to the whole grid if the result touches the box."""
        mask = check_mask_shape(mask_on_moving, self._moving_grid.shape_zyx)
        coords = np.argwhere(mask > 0)
        if coords.size == 0:
            return np.zeros((0, 0, 0), np.uint8), (slice(0, 0),) * 3
        lo, hi = coords.min(axis=0) - 0.5, coords.max(axis=0) + 0.5
        corners_zyx = np.array([[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        fixed_corners = self._fixed_grid.lps_to_index_zyx(
            self.moving_points_to_fixed(self._moving_grid.index_zyx_to_lps(corners_zyx)))
        margin = margin_mm / np.asarray(self._fixed_grid.spacing_zyx)
        shape = np.asarray(self._fixed_grid.shape_zyx)
        start = np.clip(np.floor(fixed_corners.min(axis=0) - margin), 0, shape).astype(int)
        stop = np.clip(np.ceil(fixed_corners.max(axis=0) + margin) + 1, 0, shape).astype(int)
        region = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        if any(r.stop <= r.start for r in region):
            return np.zeros((0, 0, 0), np.uint8), (slice(0, 0),) * 3
        warped = self._warped_onto(mask, start, stop - start)
        touches_border = any(np.any(np.take(warped, index, axis=axis)) for axis in range(3) for index in (0, -1)
                             if (index == 0 and start[axis] > 0) or (index == -1 and stop[axis] < shape[axis]))
        if touches_border:
            return super().warp_mask_near(mask_on_moving)
        return warped, region

    def _warped_onto(self, mask: np.ndarray, start_zyx: np.ndarray, size_zyx) -> np.ndarray:
        """The mask pulled onto the fixed-grid box of `size_zyx` voxels from index `start_zyx` (nearest
        neighbour, uint8 0/1); the box's grid is built by SimpleITK, not held."""
        grid = self._fixed_grid
        moving_mask = self._moving_grid.to_sitk((mask > 0).astype(np.uint8))
        warped = sitk.Resample(moving_mask, [int(n) for n in size_zyx[::-1]], self.transform, sitk.sitkNearestNeighbor,
                               tuple(grid.index_zyx_to_lps(start_zyx)), grid.spacing_xyz,
                               grid.direction_lps.flatten().tolist(), 0, sitk.sitkUInt8)
        return sitk.GetArrayFromImage(warped)

    def fixed_points_to_moving(self, points_lps: np.ndarray) -> np.ndarray:
        """LPS points (n, 3) of the later scan -> the corresponding LPS points of the earlier scan."""
        return np.array([self.transform.TransformPoint(tuple(map(float, p))) for p in np.atleast_2d(points_lps)])

    def moving_points_to_fixed(self, points_lps: np.ndarray, iterations: int = 50, tol_mm: float = 1e-3) -> np.ndarray:
        """LPS points (n, 3) of the earlier scan -> the later scan, by fixed-point inversion of the transform.

        The deformable part has no closed-form inverse; the iteration converges for the smooth, small residual
        deformations left once the affine part is inverted exactly.
        """
        affine_inverse = _affine_part(self.transform).GetInverse()
        inverse_matrix = np.array(affine_inverse.GetMatrix()).reshape(3, 3)
        targets = np.atleast_2d(np.asarray(points_lps, dtype=float))
        guesses = np.array([affine_inverse.TransformPoint(tuple(p)) for p in targets])
        for _ in range(iterations):
            residuals = targets - self.fixed_points_to_moving(guesses)
            guesses = guesses + residuals @ inverse_matrix.T
            if np.linalg.norm(residuals, axis=1).max() < tol_mm:
                break
        return guesses


def geometry_only(volume: ImageVolume) -> ImageVolume:
    """The volume's grid (shape, spacing, origin, direction) over a read-only zero-stride array: no voxels held."""
    return replace(volume, array=np.broadcast_to(np.zeros((), np.uint8), volume.shape_zyx))


def _affine_part(transform: sitk.Transform) -> sitk.AffineTransform:
    """The first (outermost) transform of a composite, or the transform itself, as an affine transform."""
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0)
    return sitk.AffineTransform(transform)


class ClassicalRegistration(Registration):
    """Affine (initialised from scanner geometry or centres of mass), then diffeomorphic demons, all at ~3 mm.

    Mattes mutual information drives the affine stage, so CT and MR with any intensity scaling work. The demons
    stage compares intensities directly, so the moving image is histogram-matched to the fixed one first (the
    tracker always registers two scans of one modality). A B-spline stage was the alternative; SimpleITK's
    B-spline metric gradient is dense in the control points and took minutes instead of seconds.
    """

    name = "classical"

    def __init__(
        self,
        working_spacing_mm: float = 3.0,
        deformable: bool = True,
        affine_iterations: int = 100,
        demons_iterations: int = 30,
        demons_smoothing_mm: float = 9.0,
        sampling_fraction: float = 0.2,
        threads: int = 2,
    ) -> None:
        if working_spacing_mm <= 0 or demons_smoothing_mm <= 0:
            raise ValueError("working_spacing_mm and demons_smoothing_mm must be positive.")
        if not 0 < sampling_fraction <= 1:
            raise ValueError(f"sampling_fraction must be in (0, 1]; got {sampling_fraction}.")
        self.working_spacing_mm = working_spacing_mm
        self.deformable = deformable
        self.affine_iterations = affine_iterations
        self.demons_iterations = demons_iterations
        self.demons_smoothing_mm = demons_smoothing_mm
        self.sampling_fraction = sampling_fraction
        self.threads = threads

    def register(self, moving: ImageVolume, fixed: ImageVolume) -> TransformDeformation:
        for role, volume in (("moving (earlier)", moving), ("fixed (later)", fixed)):
            if np.ptp(volume.array) == 0:
                raise RegistrationError(
                    f"The {role} scan is constant ({volume.array.flat[0]}); registration needs image content. "
                    "Check that the right image was loaded."
                )
        try:
            return self._register(moving, fixed)
        except RuntimeError as error:  # SimpleITK reports optimiser and sampling failures this way
            raise RegistrationError(
                f"Classical registration failed ({str(error).strip().splitlines()[-1]}). Check that both scans show "
                "the same body region, or try the 'gradicon' registration."
            ) from error

    def _register(self, moving: ImageVolume, fixed: ImageVolume) -> TransformDeformation:
        spacing_mm = max(
            _working_spacing(moving, self.working_spacing_mm), _working_spacing(fixed, self.working_spacing_mm)
        )
        moving_image = _working_image(moving, spacing_mm)
        fixed_image = _working_image(fixed, spacing_mm)
        affine = self._register_affine(fixed_image, moving_image)
        transform: sitk.Transform = affine
        if self.deformable:
            displacement = self._register_demons(fixed_image, moving_image, affine)
            # A composite applies its last transform first: fixed point -> + displacement -> affine -> moving point.
            transform = sitk.CompositeTransform([affine, displacement])
        return TransformDeformation(transform, moving_grid=moving, fixed_grid=fixed)

    # --- stages ---------------------------------------------------------------------------------------------
    def _affine_method(self, shrink_factors: list[int], fixed_voxels: int) -> sitk.ImageRegistrationMethod:
        method = sitk.ImageRegistrationMethod()
        method.SetNumberOfThreads(self.threads)
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
        method.SetMetricSamplingStrategy(method.RANDOM)
        # A fixed seed makes the random sampling, and so the result, reproducible.
        method.SetMetricSamplingPercentagePerLevel(
            metric_sampling_fractions(shrink_factors, fixed_voxels, self.sampling_fraction), SAMPLING_SEED)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetShrinkFactorsPerLevel(shrink_factors)
        method.SetSmoothingSigmasPerLevel([factor // 2 for factor in shrink_factors])  # voxels: 2, 1, 0
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0, minStep=1e-3, numberOfIterations=self.affine_iterations, relaxationFactor=0.6
        )
        return method

    def _register_affine(self, fixed_image: sitk.Image, moving_image: sitk.Image) -> sitk.AffineTransform:
        method = self._affine_method(_shrink_factors(fixed_image, moving_image, [4, 2, 1]),
                                     fixed_image.GetNumberOfPixels())
        initial = self._best_initial_transform(fixed_image, moving_image, method)
        method.SetInitialTransform(initial, inPlace=True)
        method.SetOptimizerScalesFromPhysicalShift()
        method.Execute(fixed_image, moving_image)
        return initial

    def _best_initial_transform(
        self, fixed_image: sitk.Image, moving_image: sitk.Image, method: sitk.ImageRegistrationMethod
    ) -> sitk.AffineTransform:
        """Scanner geometry alone or centres of mass aligned, whichever matches the images better.

        Follow-ups from the same scanner usually share a frame (geometry wins); scans with another table position
        or field of view do not (the centres of mass win).
        """
        geometry = sitk.AffineTransform(3)
        geometry.SetCenter(_image_centre_lps(fixed_image))
        moments = sitk.AffineTransform(
            sitk.CenteredTransformInitializer(
                fixed_image, moving_image, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
            )
        )
        return min((geometry, moments), key=lambda t: _metric_value(method, fixed_image, moving_image, t))

    def _register_demons(
        self, fixed_image: sitk.Image, moving_image: sitk.Image, affine: sitk.AffineTransform
    ) -> sitk.DisplacementFieldTransform:
        """Residual deformation on the fixed working grid, after the affine stage."""
        if fixed_image.GetNumberOfPixels() > DEMONS_MAX_VOXELS:
            # a large field of view: the smooth residual field is found on a 2x coarser grid (about 8x faster)
            fixed_image = sitk.BinShrink(fixed_image, [2, 2, 2])
        moving_on_fixed = sitk.Resample(moving_image, fixed_image, affine, sitk.sitkLinear, 0.0)
        matched = sitk.HistogramMatching(
            moving_on_fixed, fixed_image, numberOfHistogramLevels=64, numberOfMatchPoints=15,
            thresholdAtMeanIntensity=False,
        )
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfThreads(self.threads)
        demons.SetNumberOfIterations(self.demons_iterations)
        demons.SetStandardDeviations(self.demons_smoothing_mm / fixed_image.GetSpacing()[0])  # in voxels
        field = demons.Execute(fixed_image, matched)
        return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def metric_sampling_fractions(shrink_factors: list[int], fixed_voxels: int, fraction: float) -> list[float]:
    """The share of voxels sampled per pyramid level: `fraction`, but at most MAX_METRIC_SAMPLES. A large field of
    view at full working resolution otherwise spends most of the registration on samples that 32-bin histograms
    do not need (a 512x512x200 CT: 630 000 samples per iteration, 0.4 s each)."""
    return [min(fraction, MAX_METRIC_SAMPLES * factor**3 / max(fixed_voxels, 1)) for factor in shrink_factors]


def _metric_value(
    method: sitk.ImageRegistrationMethod, fixed_image: sitk.Image, moving_image: sitk.Image, transform: sitk.Transform
) -> float:
    method.SetInitialTransform(transform, inPlace=False)
    try:
        return method.MetricEvaluate(fixed_image, moving_image)
    except RuntimeError:  # no overlap at all: the worst candidate
        return float("inf")


def _working_spacing(volume: ImageVolume, requested_mm: float) -> float:
    """The requested isotropic spacing, made finer for small fields of view but never finer than the image."""
    extent_mm = np.array(volume.shape_zyx[::-1]) * np.array(volume.spacing_xyz)
    fov_limited = float(extent_mm.min()) / MIN_WORKING_VOXELS
    return max(min(requested_mm, fov_limited), min(volume.spacing_xyz))


def _working_image(volume: ImageVolume, spacing_mm: float) -> sitk.Image:
    """Intensities mapped to [0, 1] (robust range), anti-aliased and resampled to an isotropic grid.

    The [0, 1] range makes the centre-of-mass initialisation meaningful for z-scored inputs with negative values.
    """
    # the robust range from a subsample: percentiles of every voxel of a large CT cost seconds
    low, high = np.percentile(volume.array[::2, ::4, ::4], [0.5, 99.5])
    scaled = volume.array.astype(np.float32)  # a copy, scaled in place: whole-CT temporaries cost seconds
    scaled -= np.float32(low)
    scaled *= np.float32(1.0 / max(float(high - low), 1e-6))
    np.clip(scaled, 0.0, 1.0, out=scaled)
    image = volume.to_sitk(scaled)
    # Average whole blocks first where an axis is downsampled 3x or more (cheap anti-aliasing that shrinks the
    # image), then Gaussian anti-aliasing for what is left of the downsampling, per axis.
    block = [max(int(spacing_mm / s / 1.5), 1) for s in volume.spacing_xyz]
    if max(block) > 1:
        image = sitk.BinShrink(image, block)
    variances_mm2 = [0.25 * max(spacing_mm**2 - s**2, 0.0) for s in image.GetSpacing()]
    if max(variances_mm2) > 0:
        image = sitk.DiscreteGaussian(image, variances_mm2, maximumKernelWidth=32, useImageSpacing=True)
    extent_mm = np.array(image.GetSize()) * np.array(image.GetSpacing())
    size = [max(int(np.ceil(e / spacing_mm)), 1) for e in extent_mm]
    # Keep the first voxel's outer corner where it was so both grids cover the same physical box.
    corner_offset = (spacing_mm - np.array(image.GetSpacing())) / 2.0
    origin = np.array(image.GetOrigin()) + np.array(image.GetDirection()).reshape(3, 3) @ corner_offset
    return sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), [spacing_mm] * 3, image.GetDirection(), 0.0
    )


def _shrink_factors(fixed_image: sitk.Image, moving_image: sitk.Image, wanted: list[int]) -> list[int]:
    """Drop pyramid levels that would leave fewer than MIN_WORKING_VOXELS / 2 voxels along an axis."""
    smallest = min(min(fixed_image.GetSize()), min(moving_image.GetSize()))
    kept = [f for f in wanted if smallest / f >= MIN_WORKING_VOXELS / 2]
    return kept or [1]


def _image_centre_lps(image: sitk.Image) -> tuple[float, float, float]:
    centre_index = [(n - 1) / 2.0 for n in image.GetSize()]
    return image.TransformContinuousIndexToPhysicalPoint(centre_index)
