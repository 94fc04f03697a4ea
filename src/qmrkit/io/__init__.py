"""File formats: NIfTI (nibabel), DWI (NIfTI + FSL bval/bvec), protocol YAML, ISMRMRD/MRD HDF5
raw data and images, surfaces and per-vertex data (GIfTI, FreeSurfer geometry, MGH), BIDS datasets
in and derivatives out, and DICOM (pydicom, highdicom; series in, maps out, C-STORE to a PACS)."""

from .bids import (
    BidsDataset,
    BidsFile,
    SubjectInput,
    check_derivatives,
    find_inputs,
    to_bids_units,
)
from .dicom import DicomSeries, acquisition_values, is_dicom, read_dicom
from .dicom_out import DicomMapSeries, write_dicom_maps, write_dicom_series
from .dwi import DWI, load_dwi, save_dwi
from .geometry import (
    ScanGeometry,
    affine_from_mrd,
    from_nifti_order,
    map_from_nifti,
    to_nifti_order,
)
from .mrd import (
    RawScan,
    ScanAssembler,
    attach_header,
    header_for_scan,
    read_mrd,
    read_mrd_images,
    scan_from_acquisitions,
    write_mrd,
    write_mrd_images,
)
from .nifti import load_nifti, save_nifti
from .pacs import PacsAddress, parse_pacs_url, send_dicom
from .protocol import load_protocol
from .surface import (
    Surface,
    mesh_edges,
    read_surface,
    read_surface_data,
    write_surface,
    write_surface_map,
    write_surface_maps,
)

__all__ = [
    "load_nifti",
    "save_nifti",
    "load_protocol",
    "load_dwi",
    "save_dwi",
    "DWI",
    "RawScan",
    "read_mrd",
    "scan_from_acquisitions",
    "ScanAssembler",
    "write_mrd",
    "write_mrd_images",
    "read_mrd_images",
    "header_for_scan",
    "attach_header",
    "ScanGeometry",
    "affine_from_mrd",
    "to_nifti_order",
    "from_nifti_order",
    "map_from_nifti",
    "DicomSeries",
    "read_dicom",
    "acquisition_values",
    "is_dicom",
    "DicomMapSeries",
    "write_dicom_maps",
    "write_dicom_series",
    "PacsAddress",
    "parse_pacs_url",
    "send_dicom",
    "Surface",
    "read_surface",
    "read_surface_data",
    "write_surface",
    "write_surface_map",
    "write_surface_maps",
    "mesh_edges",
    "BidsDataset",
    "BidsFile",
    "SubjectInput",
    "find_inputs",
    "check_derivatives",
    "to_bids_units",
]
