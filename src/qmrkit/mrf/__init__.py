"""MR fingerprinting: schedules, EPG simulation, dictionaries (SVD-compressed) and matching."""

from .dictionary import Dictionary, log_grid
from .epg import epg_fisp
from .match import B1RangeWarning, MatchResult, match
from .sequences import Schedule, fisp_schedule, schedule_from_header
from .subspace import SubspaceNufft, frame_dcf, subspace_recon

__all__ = [
    "Schedule",
    "fisp_schedule",
    "schedule_from_header",
    "epg_fisp",
    "Dictionary",
    "log_grid",
    "match",
    "MatchResult",
    "B1RangeWarning",
    "SubspaceNufft",
    "subspace_recon",
    "frame_dcf",
]
