"""File formats: NIfTI (nibabel), DWI (NIfTI + FSL bval/bvec), protocol YAML and ISMRMRD/MRD HDF5
raw data and images."""

from .dwi import DWI, load_dwi
from .mrd import (
    RawScan,
    read_mrd,
    read_mrd_images,
    scan_from_acquisitions,
    write_mrd,
    write_mrd_images,
)
from .nifti import load_nifti, save_nifti
from .protocol import load_protocol

__all__ = [
    "load_nifti",
    "save_nifti",
    "load_protocol",
    "load_dwi",
    "DWI",
    "RawScan",
    "read_mrd",
    "scan_from_acquisitions",
    "write_mrd",
    "write_mrd_images",
    "read_mrd_images",
]
