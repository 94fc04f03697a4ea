"""MR fingerprinting: schedules, EPG simulation, dictionaries (SVD-compressed) and matching;
two-pool EPG-X of RF-spoiled gradient echo (:func:`epgx_spgr`)."""

from .dictionary import Dictionary, log_grid
from .epg import epg_fisp
from .epgx import epgx_spgr, exchange_matrix_exp, spgr_two_pool_steady_state
from .match import B1RangeWarning, MatchResult, match
from .sequences import Schedule, fisp_schedule, schedule_from_header
from .subspace import SubspaceNufft, frame_dcf, subspace_recon

__all__ = [
    "Schedule",
    "fisp_schedule",
    "schedule_from_header",
    "epg_fisp",
    "epgx_spgr",
    "spgr_two_pool_steady_state",
    "exchange_matrix_exp",
    "Dictionary",
    "log_grid",
    "match",
    "MatchResult",
    "B1RangeWarning",
    "SubspaceNufft",
    "subspace_recon",
    "frame_dcf",
]
