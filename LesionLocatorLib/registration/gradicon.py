"""uniGradICON registration as in LesionLocator's tracking network (the Track checkpoint's `reg_net`).

Both scans are stretched to the network grid (175³) over their own field of view, only φ_AB (A = moving/earlier,
B = fixed/later) is computed, and masks are pulled back through φ_AB with nearest-neighbour sampling.
The network is assembled from icon_registration's own modules so that `unigradicon` (which imports itk) is not
needed; the module tree equals `unigradicon.make_network(..., include_last_step=True)`, so the keys match.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
import icon_registration as icon
from icon_registration import networks
from icon_registration.mermaidlite import compute_warped_image_multiNC, identity_map_multiN

from LesionLocatorLib.errors import CheckpointError
from LesionLocatorLib.image import ImageVolume
from LesionLocatorLib.registration.base import Deformation, Registration, check_mask_shape

NETWORK_SHAPE_ZYX = (175, 175, 175)
# The coarsest tallUNet2 runs at 1/4 of the grid and halves it 5 times; below this it runs out of voxels.
MIN_NETWORK_SIZE = 65
TRACK_PREFIX = "reg_net."


class UniGradICONNet(icon.RegistrationModule):
    """The root of uniGradICON's module tree (GradientICONSparse) without its training losses."""

    def __init__(self, regis_net: icon.RegistrationModule) -> None:
        super().__init__()
        self.regis_net = regis_net

    def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
        """φ_AB sampled on the identity grid, (1, 3, *shape) in [0, 1] coordinates; A warped by it ≈ B."""
        # The tag makes FunctionFromVectorField add its displacement directly instead of resampling it (icon's
        # shortcut); GradientICONSparse sets it the same way, so φ_AB equals the official one.
        self.identity_map.isIdentity = True
        return self.regis_net(image_a, image_b)(self.identity_map)


def build_unigradicon(input_shape_zyx: tuple[int, int, int] = NETWORK_SHAPE_ZYX) -> UniGradICONNet:
    """uniGradICON: tallUNet2 steps at 1/4, 1/2 and full resolution, then the full-resolution 'last step'."""
    inner: icon.RegistrationModule = icon.FunctionFromVectorField(networks.tallUNet2(dimension=3))
    for _ in range(2):
        inner = icon.TwoStepRegistration(
            icon.DownsampleRegistration(inner, dimension=3),
            icon.FunctionFromVectorField(networks.tallUNet2(dimension=3)),
        )
    inner = icon.TwoStepRegistration(inner, icon.FunctionFromVectorField(networks.tallUNet2(dimension=3)))
    net = UniGradICONNet(inner)
    net.assign_identity_map([1, 1, *input_shape_zyx])
    return net


class GradICONDeformation(Deformation):
    """φ_AB on the network grid; masks of the moving scan are pulled through it onto the fixed scan's grid."""

    def __init__(self, phi_ab: torch.Tensor, moving_shape_zyx: tuple[int, ...], fixed_shape_zyx: tuple[int, ...]):
        self.phi_ab = phi_ab  # (1, 3, *grid), float32, [0, 1] coordinates, channel i = tensor dim i + 2 (z, y, x)
        self.moving_shape_zyx = tuple(moving_shape_zyx)
        self.fixed_shape_zyx = tuple(fixed_shape_zyx)

    @property
    def grid_shape_zyx(self) -> tuple[int, int, int]:
        return tuple(self.phi_ab.shape[2:])

    def displacement_voxels(self) -> np.ndarray:
        """φ_AB − identity as (3, *grid) float32 in network-grid voxels; channel i is along axis i (z, y, x)."""
        identity = identity_map_multiN([1, 1, *self.grid_shape_zyx], self._grid_spacing())
        voxels_per_unit = np.array(self.grid_shape_zyx, dtype=np.float32) - 1
        displacement = self.phi_ab[0].cpu().numpy() - identity[0]
        return (displacement * voxels_per_unit[:, None, None, None]).astype(np.float32)

    def warp_mask(self, mask_on_moving: np.ndarray) -> np.ndarray:
        mask = check_mask_shape(mask_on_moving, self.moving_shape_zyx)
        mask_tensor = torch.from_numpy((mask > 0).astype(np.float32))[None, None].to(self.phi_ab.device)
        with torch.inference_mode():
            on_grid = F.interpolate(mask_tensor, size=self.grid_shape_zyx, mode="nearest-exact")
            # spline order 0 = nearest neighbour; outside the moving image the mask is 0.
            warped = compute_warped_image_multiNC(on_grid, self.phi_ab, self._grid_spacing(), 0, zero_boundary=True)
            on_fixed = F.interpolate(warped, size=self.fixed_shape_zyx, mode="nearest-exact")
        return on_fixed[0, 0].to(torch.uint8).cpu().numpy()

    def _grid_spacing(self) -> np.ndarray:
        return 1.0 / (np.array(self.grid_shape_zyx) - 1)


class GradICONRegistration(Registration):
    """The uniGradICON network of a LesionLocator Track checkpoint (keys `reg_net.*`, prefix stripped)."""

    name = "gradicon"

    def __init__(
        self,
        reg_state_dict: Mapping[str, torch.Tensor],
        device: torch.device | str = "cpu",
        input_shape: tuple[int, int, int] = NETWORK_SHAPE_ZYX,
    ) -> None:
        self.device = torch.device(device)
        self.input_shape_zyx = tuple(int(n) for n in input_shape)
        if len(self.input_shape_zyx) != 3 or min(self.input_shape_zyx) < MIN_NETWORK_SIZE:
            raise ValueError(
                f"input_shape must be 3 sizes of at least {MIN_NETWORK_SIZE}; got {input_shape} "
                "(the official grid is 175³)."
            )
        self.network = build_unigradicon(self.input_shape_zyx)
        try:
            self.network.load_state_dict(dict(reg_state_dict), strict=True)
        except RuntimeError as error:
            raise CheckpointError(
                "The registration weights do not fit the uniGradICON architecture of LesionLocator's tracking "
                f"network ({str(error).splitlines()[0]} ...). Use an official LesionLocatorTrack checkpoint."
            ) from error
        # eval(): BatchNorm must use the stored running statistics.
        self.network.to(self.device).eval()

    @classmethod
    def from_track_state_dict(
        cls, track_state_dict: Mapping[str, torch.Tensor], device: torch.device | str = "cpu", **options
    ) -> "GradICONRegistration":
        """Build from a whole Track checkpoint state dict (`network_weights`), picking its `reg_net.` entries."""
        reg_state_dict = {k[len(TRACK_PREFIX):]: v for k, v in track_state_dict.items() if k.startswith(TRACK_PREFIX)}
        if not reg_state_dict:
            raise CheckpointError(
                "This checkpoint has no registration network (no 'reg_net.*' weights); "
                "use a LesionLocatorTrack checkpoint or the 'classical' registration."
            )
        return cls(reg_state_dict, device=device, **options)

    def register(self, moving: ImageVolume, fixed: ImageVolume) -> GradICONDeformation:
        """Only φ_AB (A = moving, B = fixed): GradientICONSparse's reverse pass and losses are training-only."""
        image_a = self._on_network_grid(moving.array)
        image_b = self._on_network_grid(fixed.array)
        with torch.inference_mode(), self._autocast():
            phi_ab = self.network(image_a, image_b)
        return GradICONDeformation(phi_ab.float(), moving.shape_zyx, fixed.shape_zyx)

    def _on_network_grid(self, array_zyx: np.ndarray) -> torch.Tensor:
        """Each scan is stretched trilinearly over its own field of view; intensities go in as preprocessed
        (nnU-Net-normalized, no further scaling; this reproduces the official displacements to float16 precision)."""
        tensor = torch.from_numpy(np.ascontiguousarray(array_zyx, dtype=np.float32))[None, None].to(self.device)
        with torch.inference_mode():
            return F.interpolate(tensor, size=self.input_shape_zyx, mode="trilinear", align_corners=False)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """fp16 on CUDA (the official GPU precision); fp32 elsewhere (CPU has no Half kernel for avg_pool3d)."""
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()
