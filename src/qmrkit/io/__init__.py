"""File formats: NIfTI (nibabel), DWI (NIfTI + FSL bval/bvec), protocol YAML, ISMRMRD/MRD HDF5
raw data and images, surfaces and per-vertex data (GIfTI, FreeSurfer geometry, MGH), BIDS datasets
in and derivatives out, and DICOM (pydicom, highdicom; series in, maps out, C-STORE to a PACS).

The names below are imported from their modules on first use (module ``__getattr__``): reading a
NIfTI file (``qmrkit.io.nifti``, what ``qmrkit fit`` needs) does not import the DICOM, MRD, BIDS,
PACS or surface readers and their dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
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

# public name -> the submodule defining it
_EXPORTS = {
    "load_nifti": "nifti",
    "save_nifti": "nifti",
    "load_protocol": "protocol",
    "load_dwi": "dwi",
    "save_dwi": "dwi",
    "DWI": "dwi",
    "RawScan": "mrd",
    "read_mrd": "mrd",
    "scan_from_acquisitions": "mrd",
    "ScanAssembler": "mrd",
    "write_mrd": "mrd",
    "write_mrd_images": "mrd",
    "read_mrd_images": "mrd",
    "header_for_scan": "mrd",
    "attach_header": "mrd",
    "ScanGeometry": "geometry",
    "affine_from_mrd": "geometry",
    "to_nifti_order": "geometry",
    "from_nifti_order": "geometry",
    "map_from_nifti": "geometry",
    "DicomSeries": "dicom",
    "read_dicom": "dicom",
    "acquisition_values": "dicom",
    "is_dicom": "dicom",
    "DicomMapSeries": "dicom_out",
    "write_dicom_maps": "dicom_out",
    "write_dicom_series": "dicom_out",
    "PacsAddress": "pacs",
    "parse_pacs_url": "pacs",
    "send_dicom": "pacs",
    "Surface": "surface",
    "read_surface": "surface",
    "read_surface_data": "surface",
    "write_surface": "surface",
    "write_surface_map": "surface",
    "write_surface_maps": "surface",
    "mesh_edges": "surface",
    "BidsDataset": "bids",
    "BidsFile": "bids",
    "SubjectInput": "bids",
    "find_inputs": "bids",
    "check_derivatives": "bids",
    "to_bids_units": "bids",
}

__all__ = [  # literal, so that linters see the TYPE_CHECKING imports as the public API
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
# submodules, reachable as attributes as when this file imported them all
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, {*_EXPORTS.values(), "figures"}, __all__)
