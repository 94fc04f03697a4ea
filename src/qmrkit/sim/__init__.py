"""Simulation: numerical phantoms, noise, synthetic series (used by tests, demos and benchmarks)."""

from .bids import bids_dataset
from .brain import BRAIN_TISSUES, brain_phantom
from .coils import coil_maps
from .diffusion import (
    AXCALIBER_SHELLS,
    AXCALIBER_TISSUES,
    DWI_LABELS,
    DWI_TISSUES,
    NEXI_SHELLS,
    SANDI_SHELLS,
    SANDI_TISSUES,
    DwiPhantom,
    DwiProtocol,
    dispersed_axcaliber_signal,
    dispersed_nexi_signal,
    dispersed_sandi_signal,
    dwi_phantom,
    dwi_protocol,
    odf_p2,
    watson_orientations,
)
from .masks import calibration_region, cartesian_mask
from .mrf import b1_field, mrf_scan, mrf_scan_3d, spiral_frames, stack_of_spirals_frames
from .noise import add_noise
from .phantoms import CARDIAC_TISSUES, cardiac_phantom, nist_phantom
from .raw import raw_scan
from .relaxometry import MOLLI_TI, molli_series
from .shepp_logan import SHEPP_LOGAN_TISSUES, shepp_logan

__all__ = [
    "bids_dataset",
    "cardiac_phantom",
    "nist_phantom",
    "CARDIAC_TISSUES",
    "add_noise",
    "molli_series",
    "MOLLI_TI",
    "shepp_logan",
    "SHEPP_LOGAN_TISSUES",
    "coil_maps",
    "cartesian_mask",
    "calibration_region",
    "raw_scan",
    "brain_phantom",
    "BRAIN_TISSUES",
    "mrf_scan",
    "mrf_scan_3d",
    "b1_field",
    "spiral_frames",
    "stack_of_spirals_frames",
    "dwi_phantom",
    "dwi_protocol",
    "DwiPhantom",
    "DwiProtocol",
    "DWI_TISSUES",
    "DWI_LABELS",
    "NEXI_SHELLS",
    "dispersed_nexi_signal",
    "dispersed_axcaliber_signal",
    "dispersed_sandi_signal",
    "AXCALIBER_SHELLS",
    "AXCALIBER_TISSUES",
    "SANDI_SHELLS",
    "SANDI_TISSUES",
    "odf_p2",
    "watson_orientations",
]
