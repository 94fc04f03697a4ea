"""File formats: NIfTI (nibabel) and protocol YAML; ISMRMRD/MRD comes with reconstruction."""

from .nifti import load_nifti, save_nifti
from .protocol import load_protocol

__all__ = ["load_nifti", "save_nifti", "load_protocol"]
