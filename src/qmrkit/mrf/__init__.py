"""MR fingerprinting: schedules, EPG simulation, dictionaries (SVD-compressed) and matching."""

from .dictionary import Dictionary, log_grid
from .epg import epg_fisp
from .match import B1RangeWarning, MatchResult, match
from .sequences import Schedule, fisp_schedule
from .subspace import SubspaceNufft, subspace_recon

__all__ = [
    "Schedule",
    "fisp_schedule",
    "epg_fisp",
    "Dictionary",
    "log_grid",
    "match",
    "MatchResult",
    "B1RangeWarning",
    "SubspaceNufft",
    "subspace_recon",
]
