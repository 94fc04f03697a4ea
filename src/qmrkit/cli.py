"""The ``qmrkit`` command line: ``qmrkit --help`` lists the subcommands.

Exit status: 0 success; 1 a server reported errors (``send``) or an internal error (a bug: its
traceback is printed); 2 a user mistake (bad flag or value, missing or unreadable file, unwritable
output folder, unreachable server, busy port), reported as one line ``qmrkit CMD: error: ...``
before any expensive work where it can be checked up front. Warnings about the input (e.g. flip
angles that look like radians) are one line ``qmrkit CMD: warning: ...`` and the run continues.
``-vv`` adds the traceback to user errors too. ``--quiet`` hides progress bars and log messages
below errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ParameterError, QmrkitError, QmrkitWarning, ShapeError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage of a command is many lines; --help shows it)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# -- argument types: checked while parsing, so a bad value stops before anything runs ------------
def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None


def _number(kind: type, minimum: float, *, strict: bool = False, maximum: float | None = None):
    """A type converter for ``kind`` values ≥ ``minimum`` (> when ``strict``), ≤ ``maximum``."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        low_ok = value > minimum if strict else value >= minimum
        if not low_ok or (maximum is not None and value > maximum) or value != value:
            rng = f"{'>' if strict else '>='} {minimum:g}"
            if maximum is not None:
                rng += f" and <= {maximum:g}"
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in some messages
    return convert


_positive_int = _number(int, 0, strict=True)
_count = _number(int, 0)
_positive = _number(float, 0, strict=True)
_nonnegative = _number(float, 0)
_port = _number(int, 0, maximum=65535)


def _tv_term(text: str) -> tuple[str | None, float]:
    """``--tv LAMBDA`` (every parameter) or ``--tv NAME:LAMBDA`` (one parameter or map name)."""
    name, sep, value = text.rpartition(":")
    try:
        lam = float(value)
    except ValueError:
        lam = float("nan")
    if not lam >= 0 or (sep and not name.strip()):
        raise argparse.ArgumentTypeError(
            "expected LAMBDA or NAME:LAMBDA with LAMBDA >= 0 (e.g. 0.001 or fn:0.001), "
            f"got {text!r}"
        )
    return (name.strip() or None) if sep else None, lam


def _input_file(text: str) -> Path:
    """An existing file (checked at parse time: a typo fails before any data is read)."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"file not found: {p}")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{p} is a folder, not a file")
    if not os.access(p, os.R_OK):
        raise argparse.ArgumentTypeError(f"{p} is not readable (permission denied)")
    return p


def _fixed_arg(text: str) -> dict[str, float]:
    """``--fix NAME=VALUE[,NAME=VALUE...]``: parameters held constant (physical units)."""
    out: dict[str, float] = {}
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected NAME=VALUE pairs separated by commas (e.g. df_MW=5,df_AW=-2), "
                f"got {text!r}"
            ) from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE pairs, got {text!r}")
    return out


def _mask_arg(text: str) -> str | Path:
    """``--mask auto`` (the default), ``--mask none`` or a mask NIfTI file."""
    if text.strip().lower() in ("auto", "none"):
        return text.strip().lower()
    return _input_file(text)


def _input_path(text: str) -> Path:
    """An existing file or folder (a DICOM series may be a folder of files)."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"file not found: {p}")
    if not os.access(p, os.R_OK):
        raise argparse.ArgumentTypeError(f"{p} is not readable (permission denied)")
    return p


def _pacs_url(text: str) -> str:
    """``pacs://AET@host:port``, checked while parsing."""
    from .io.pacs import parse_pacs_url

    try:
        parse_pacs_url(text)
    except QmrkitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _ae_title(text: str) -> str:
    from .io.pacs import check_ae_title

    try:
        return check_ae_title(text, "--calling-aet")
    except QmrkitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_dicom_out(p: argparse.ArgumentParser) -> None:
    """``--dicom-out``, ``--send-to`` and ``--calling-aet`` (fit and mrf)."""
    p.add_argument(
        "--dicom-out",
        choices=("pmap", "mr", "both"),
        help="also write every map as DICOM under OUT/dicom/: pmap = Parametric Map (float "
        "values, UCUM units), mr = MR images with a rescale slope (for viewers without "
        "Parametric Map support), both (default with --send-to); needs pip install "
        "'qmrkit[dicom]'",
    )
    p.add_argument(
        "--send-to",
        type=_pacs_url,
        metavar="pacs://AET@HOST:PORT",
        help="send every DICOM map series to this PACS by C-STORE",
    )
    p.add_argument(
        "--calling-aet",
        type=_ae_title,
        default="QMRKIT",
        help="qmrkit's AE title towards the PACS (default QMRKIT)",
    )


def _model_name(text: str) -> str:
    """A model of the registry (checked first: the model decides which flags are needed)."""
    from .models.registry import check_name

    try:
        check_name(text)
    except QmrkitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _device(text: str) -> str:
    """A device this machine has ('cpu', 'cuda', 'cuda:N'), or an error saying what exists."""
    from ._device import resolve_device
    from .errors import DeviceError

    try:
        resolve_device(text)
    except DeviceError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("device='cpu'", "--device cpu")) from None
    return text


def _check_output_folder(path: Path, flag: str = "--out") -> None:
    """Fail before any work when ``path`` cannot become a writable folder (nothing is created)."""
    if path.exists() and not path.is_dir():
        raise ParameterError(f"{flag} {path}: exists and is not a folder")
    anc = path
    while not anc.exists():  # the nearest existing ancestor decides ('.' always exists)
        anc = anc.parent
    if not anc.is_dir():
        raise ParameterError(f"{flag} {path}: cannot create a folder there, {anc} is a file")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ParameterError(f"{flag} {path}: {anc} is not writable (permission denied)")


_THREADS_HELP = (
    "torch intra-op threads (default: $QMRKIT_NUM_THREADS, else $OMP_NUM_THREADS, else the CPUs "
    "this process may use); OpenMP waits passively (OMP_WAIT_POLICY=PASSIVE unless set)"
)


def _add_common(p: argparse.ArgumentParser, *, progress: bool = True) -> None:
    """Options every command accepts after its name too (``qmrkit fit ... --quiet``)."""
    # SUPPRESS: when absent, the value given before the command (or its default) stays
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars, log only errors (overrides --progress)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log output (-vv: debug, and tracebacks of errors)",
    )
    p.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS, help=_THREADS_HELP)
    if progress:
        p.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="show progress bars (default: on a terminal or in a notebook)",
        )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qmrkit",
        description="Quantitative MRI maps from image series and raw data, on CPU or GPU.",
        epilog="Run 'qmrkit COMMAND --help' for the options of a command.",
    )
    p.add_argument("--version", action="version", version=f"qmrkit {__version__}")
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, log only errors")
    p.add_argument("--threads", type=_positive_int, default=None, help=_THREADS_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_fit_parser(sub)

    m = sub.add_parser(
        "models",
        help="list the signal models, their parameters and the flags they need",
        description="List the signal models of 'qmrkit fit', their parameters (bounds, units) "
        "and the acquisition flags each needs.",
    )
    _add_common(m, progress=False)
    _add_serve_parser(sub)
    _add_send_parser(sub)
    _add_recon_parser(sub)
    _learn_parser(sub)
    _add_mrf_parser(sub)
    from .dist.cli import add_batch_parser  # qmrkit batch lives with the Dask code

    add_batch_parser(sub)
    return p


def _add_fit_parser(sub: Any) -> None:
    f = sub.add_parser(
        "fit",
        help="fit a signal model to every voxel of an image series (NIfTI or DICOM)",
        description="Fit a signal model to every voxel of an image series — NIfTI "
        "(measurement axis last) or a DICOM series (a folder or files; the acquisition settings "
        "are read from it) — and write NIfTI maps, a PNG figure and a JSON sidecar, optionally "
        "DICOM maps sent to a PACS.",
    )
    f.add_argument(
        "model",
        type=_model_name,
        help="model name (see 'qmrkit models'), e.g. molli, vfa, t2, t2star, dti, nexi",
    )
    f.add_argument(
        "--data",
        type=_input_path,
        help="image series (relaxometry models): NIfTI (*spatial, n_meas), or DICOM: a folder "
        "or file of one series, its TI/TE/flip angles/TR read from the files (flags override)",
    )
    f.add_argument(
        "--series",
        metavar="UID",
        help="SeriesInstanceUID to read when a DICOM --data folder holds several series",
    )
    f.add_argument(
        "--dwi", type=_input_file, help="diffusion-weighted series, 4D NIfTI (dti, nexi)"
    )
    f.add_argument("--bval", type=_input_file, help="FSL b-values file, s/mm² (with --dwi)")
    f.add_argument(
        "--bvec", type=_input_file, help="FSL b-vectors file, 3 rows, FSL's frame (with --dwi)"
    )
    f.add_argument(
        "--json",
        type=_input_file,
        help="BIDS JSON sidecar of --dwi with δ/Δ in s (SmallDelta/BigDelta)",
    )
    f.add_argument("--ti", type=_floats, help="inversion times in ms, e.g. 100,180,260,...")
    f.add_argument("--te", type=_floats, help="echo times in ms, e.g. 10,20,30")
    f.add_argument(
        "--fa", "--flip-angles", dest="flip_angles", type=_floats, help="flip angles in degrees"
    )
    f.add_argument("--tr", type=_positive, help="repetition time in ms")
    f.add_argument(
        "--b1",
        type=_input_file,
        help="B1 map (fraction of nominal), NIfTI in the series' (x, y[, z]) shape (vfa, mcr-mwi)",
    )
    f.add_argument(
        "--phase",
        type=_input_file,
        help="phase images in radians, NIfTI of --data's shape: --data is then the magnitude and "
        "the complex series magnitude·exp(i·phase) is fitted (complex models: three-pool-gre, "
        "mcr-mwi)",
    )
    f.add_argument(
        "--surrogate",
        type=_input_file,
        help="mcr-mwi: EPG-X surrogate (.safetensors) from "
        "qmrkit.models.myelin.train_mcr_mwi_surrogate for this TR (without it EPG-X is "
        "simulated directly: exact but slow)",
    )
    f.add_argument(
        "--fix",
        dest="fixed",
        type=_fixed_arg,
        metavar="NAME=VALUE[,...]",
        help="hold parameters constant, physical units (three-pool-gre, mcr-mwi), e.g. "
        "df_MW=5,df_AW=-2",
    )
    f.add_argument(
        "--protocol",
        type=_input_file,
        help="YAML file with the acquisition settings; with --dwi: YAML or TSV with per-volume "
        "b (ms/µm²), small_delta and big_delta (ms)",
    )
    f.add_argument(
        "--mask",
        type=_mask_arg,
        default="auto",
        metavar="auto|none|FILE",
        help="voxels to fit: auto (default) = the object found in the data (Otsu threshold on "
        "the root-sum-of-squares over measurements, small holes filled; background voxels come "
        "out NaN; method, threshold and voxel count in fit.json), none = every voxel, or a mask "
        "NIfTI (non-zero voxels are fitted), (x, y[, z])",
    )
    f.add_argument(
        "--solver",
        choices=("lm", "adam", "dictionary", "mcmc"),
        default="lm",
        help="lm: Levenberg-Marquardt (default); adam: whole-volume gradient descent; "
        "dictionary: dictionary search only; mcmc: posterior mean/std maps (diffusion models)",
    )
    f.add_argument(
        "--loss",
        choices=("l1", "l2", "huber"),
        help="loss for --solver adam (default l2; diffusion models l1, as GACELLE)",
    )
    f.add_argument(
        "--tv",
        type=_tv_term,
        action="append",
        metavar="[NAME:]LAMBDA",
        help="total variation for --solver adam: LAMBDA on all parameters except amplitudes, or "
        "NAME:LAMBDA on one parameter or map (e.g. fn:0.001); repeatable",
    )
    f.add_argument(
        "--tv-dims",
        type=int,
        choices=(2, 3),
        help="TV over the first 2 image axes (in-plane) or 3 (volumetric; default: all)",
    )
    f.add_argument(
        "--max-iter",
        type=_positive_int,
        help="maximum iterations (lm: 100, adam: its default); mcmc: steps (default 2000)",
    )
    f.add_argument(
        "--mcmc-preset",
        choices=("gacelle-mh", "gacelle-ensemble"),
        help="--solver mcmc: GACELLE's sampler settings (paper 004 table 1; 10%% burn-in, "
        "thinning 100, 900 samples per voxel): gacelle-mh = Metropolis-Hastings, 4 chains x "
        "25000 steps; gacelle-ensemble = 50 walkers x 2000 steps (--max-iter overrides the steps)",
    )
    f.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cpu)")
    f.add_argument("--float64", action="store_true", help="compute in float64 (default float32)")
    f.add_argument("--out", required=True, type=Path, help="output folder")
    f.add_argument(
        "--no-figure",
        action="store_true",
        help="do not write the PNG figure (by default it is rendered in a separate process "
        "while the maps are written)",
    )
    f.add_argument(
        "--timings",
        action="store_true",
        help="print the time of each stage (startup, import, read, mask, fit, write, figure); "
        "always recorded in fit.json under Timings",
    )
    _add_dicom_out(f)
    _add_common(f)


def _add_serve_parser(sub: Any) -> None:
    sv = sub.add_parser(
        "serve",
        help="run the MRD streaming reconstruction server",
        description="Serve reconstructions over the MRD/ISMRMRD streaming protocol until "
        "SIGTERM/SIGINT, then drain in-flight scans.",
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=_port, default=9002, help="TCP port (default 9002; 0: any)")
    sv.add_argument(
        "--store", type=Path, help="dependency store directory (shared volume in a cluster)"
    )
    sv.add_argument(
        "--max-concurrent",
        type=_positive_int,
        default=1,
        help="reconstructions at once (others queue; default 1)",
    )
    sv.add_argument(
        "--max-connections",
        type=_positive_int,
        default=1024,
        help="connections served at once; more are refused with an error (default 1024)",
    )
    sv.add_argument("--metrics-port", type=_port, help="serve Prometheus /metrics on this port")
    sv.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the metrics endpoint (default 127.0.0.1: only local scrapers)",
    )
    sv.add_argument(
        "--grace",
        type=_nonnegative,
        default=600.0,
        help="seconds to drain in-flight scans on SIGTERM (default 600)",
    )
    sv.add_argument(
        "--read-timeout",
        type=_positive,
        default=120.0,
        help="drop a connection idle this long, s (default 120)",
    )
    sv.add_argument(
        "--min-rate",
        type=_nonnegative,
        default=1024.0,
        help="drop a client sending fewer bytes/s than this over 30 s (default 1024; 0: off)",
    )
    sv.add_argument(
        "--session-deadline",
        type=_positive,
        default=3600.0,
        help="longest one upload may take, s (default 3600)",
    )
    sv.add_argument("--tls-cert", type=_input_file, help="server certificate (PEM) for TLS")
    sv.add_argument("--tls-key", type=_input_file, help="server private key (PEM)")
    sv.add_argument(
        "--tls-ca", type=_input_file, help="CA bundle: require client certificates signed by it"
    )
    sv.add_argument(
        "--isolate",
        action="store_true",
        help="run each reconstruction in its own process: a crash or runaway scan ends only "
        "its session",
    )
    sv.add_argument(
        "--scan-timeout",
        type=_positive,
        help="stop a reconstruction after this many seconds (needs --isolate)",
    )
    sv.add_argument(
        "--scan-memory",
        type=_positive,
        metavar="MIB",
        help="stop a reconstruction whose resident memory passes this many MiB (needs --isolate)",
    )
    sv.add_argument(
        "--pipelines-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE, which registers extra pipelines (repeatable)",
    )
    sv.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="with --tls-cert but no --tls-ca: accept clients without a certificate",
    )
    sv.add_argument(
        "--send-to",
        type=_pacs_url,
        metavar="pacs://AET@HOST:PORT",
        help="also write every finished map series (fit:<model>, mrf) as DICOM and send it to "
        "this PACS by C-STORE, in the background after the reply; needs pip install "
        "'qmrkit[dicom]'",
    )
    sv.add_argument(
        "--calling-aet",
        type=_ae_title,
        default="QMRKIT",
        help="qmrkit's AE title towards the PACS (default QMRKIT)",
    )
    sv.add_argument(
        "--dicom-kind",
        choices=("pmap", "mr", "both"),
        default="both",
        help="with --send-to: Parametric Map (float values, UCUM units), MR images with a "
        "rescale slope, or both (default)",
    )
    sv.add_argument(
        "--pacs-retries",
        type=_count,
        default=3,
        help="with --send-to: further attempts when the PACS cannot be reached, 2, 4, 8 s "
        "apart (default 3)",
    )
    _add_common(sv, progress=False)


def _add_send_parser(sub: Any) -> None:
    sd = sub.add_parser(
        "send",
        help="stream an ISMRMRD file to a server and save what comes back",
        description="Stream the header, acquisitions and images of an ISMRMRD/MRD file to a "
        "'qmrkit serve' (or other MRD) server and save the images it returns. A file of images "
        "without an XML header (as written by qmrkit.io.write_mrd_images) is sent with a minimal "
        "header built from the images; give the acquisition settings with --param.",
    )
    sd.add_argument("scan", type=_input_file, help="ISMRMRD/MRD HDF5 file")
    sd.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    sd.add_argument("--port", type=_port, default=9002, help="server port (default 9002)")
    sd.add_argument(
        "--config",
        required=True,
        help="pipeline: sense, tv, gridding, mrf, fit:<model>, store-b1, store-noise, null, "
        "dependency-query (sends the header only; the answer goes to OUT/dependencies.json)",
    )
    sd.add_argument(
        "--compress",
        type=_positive,
        help="tolerated SNR loss for raw-data compression, e.g. 0.01 (needs noise scans)",
    )
    sd.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="pipeline parameter (repeatable), e.g. ti=[100,200] or kind=T2star",
    )
    sd.add_argument(
        "--retries",
        type=_count,
        default=3,
        help="reconnect attempts with exponential backoff from 1 s (default 3)",
    )
    sd.add_argument("--tls-cert", type=_input_file, help="client certificate (PEM) for mutual TLS")
    sd.add_argument("--tls-key", type=_input_file, help="client private key (PEM)")
    sd.add_argument(
        "--tls-ca", type=_input_file, help="CA that signed the server's certificate (enables TLS)"
    )
    sd.add_argument(
        "--tls-server-name",
        help="name the server's certificate must carry (default: --host); checked always",
    )
    sd.add_argument(
        "--out", required=True, type=Path, help="output folder (images.h5, NIfTI, log.txt)"
    )
    _add_common(sd, progress=False)


def _add_mrf_parser(sub: Any) -> None:
    mr = sub.add_parser(
        "mrf",
        help="MR fingerprinting: ISMRMRD spiral raw data -> T1, T2, PD maps",
        description="Reconstruct an MRF scan (one spiral interleaf per TR, schedule in the "
        "header's sequenceParameters) by subspace reconstruction and dictionary matching.",
    )
    mr.add_argument("scan", type=_input_file, help="ISMRMRD/MRD HDF5 raw data")
    mr.add_argument(
        "--b1",
        type=_input_file,
        help="B1 map (fraction of nominal), NIfTI in the image's geometry (x, y[, z])",
    )
    mr.add_argument(
        "--dictionary",
        type=_input_file,
        help="dictionary .npz (default: simulated for the schedule)",
    )
    mr.add_argument(
        "--dictionary-step",
        type=_positive,
        default=0.05,
        help="relative T1/T2 grid step of the default dictionary (default 0.05 = 5 %%)",
    )
    mr.add_argument(
        "--b1-step",
        type=_positive,
        default=0.05,
        help="B1 grid step of the default dictionary (default 0.05)",
    )
    mr.add_argument(
        "--n-iter", type=_count, default=0, help="low-rank CG refinement iterations (default 0)"
    )
    mr.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cpu)")
    mr.add_argument("--out", required=True, type=Path, help="output folder")
    _add_dicom_out(mr)
    _add_common(mr)


def _add_recon_parser(sub: Any) -> None:
    r = sub.add_parser(
        "recon",
        help="reconstruct images from an ISMRMRD/MRD raw-data file",
        description="Reconstruct an ISMRMRD/MRD HDF5 raw scan (Cartesian or non-Cartesian) by "
        "CG-SENSE, TV-regularised SENSE or gridding, with noise prewhitening and automatic coil "
        "maps (ESPIRiT or Walsh); write NIfTI magnitude/phase, a PNG, a JSON sidecar and the "
        "images as ISMRMRD.",
    )
    r.add_argument("scan", type=_input_file, help="ISMRMRD/MRD HDF5 file (.h5)")
    r.add_argument(
        "--method",
        choices=("sense", "tv", "gridding"),
        default="sense",
        help="sense: CG-SENSE (default); tv: TV-regularised SENSE (PDHG); gridding: adjoint NUFFT",
    )
    r.add_argument(
        "--lam",
        type=_nonnegative,
        help="regularisation weight (SENSE: Tikhonov, default 0; TV: default 1e-3; scale-free)",
    )
    r.add_argument("--max-iter", type=_positive_int, help="solver iterations (SENSE 30, TV 100)")
    r.add_argument(
        "--maps",
        choices=("auto", "espirit", "walsh"),
        default="auto",
        help="coil maps (auto: ESPIRiT for Cartesian, Walsh otherwise)",
    )
    r.add_argument(
        "--virtual-coils", type=_positive_int, help="compress to this many coils first (SVD)"
    )
    r.add_argument("--no-prewhiten", action="store_true", help="skip noise prewhitening")
    r.add_argument(
        "--dataset", default="dataset", help="dataset group in the file (default 'dataset')"
    )
    r.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cpu)")
    r.add_argument("--out", required=True, type=Path, help="output folder")
    r.add_argument("--no-figure", action="store_true", help="do not write the PNG figure")
    _add_common(r)


def _cmd_recon(args: argparse.Namespace) -> int:
    import numpy as np

    from .io.mrd import read_mrd, write_mrd_images
    from .recon import reconstruct

    t0 = time.perf_counter()
    scan = read_mrd(args.scan, dataset=args.dataset)
    result, _ = reconstruct(
        scan,
        args.method,
        lam=args.lam,
        max_iter=args.max_iter,
        maps=args.maps,
        whiten=not args.no_prewhiten,
        n_virtual=args.virtual_coils,
        device=args.device,
        progress=args.progress,
    )
    result.settings["input"] = str(args.scan)
    # voxel sizes (mm) in NIfTI order (x, y, z); 2D images get a unit third axis
    vox = [f / n for f, n in zip(scan.fov_mm, scan.recon_size, strict=True)][::-1]
    affine = np.diag([*vox, *([1.0] * (3 - len(vox))), 1.0])
    written = result.save(args.out, name="recon", affine=affine, png=not args.no_figure)
    written.append(
        write_mrd_images(args.out / "recon.h5", result.image, name="image_0", fov_mm=scan.fov_mm)
    )
    print(result.summary())
    print(f"wrote {len(written)} files to {args.out} in {time.perf_counter() - t0:.2f} s")
    return 0


# example settings, only to build each model for listing its parameters
_MODEL_EXAMPLES = {
    "molli": {"ti": [100, 1000]},
    "ir": {"ti": [100, 1000]},
    "vfa": {"flip_angles": [3, 15], "tr": 15},
    "t2": {"te": [10, 20]},
    "t2star": {"te": [5, 10]},
    "r2star": {"te": [5, 10]},
    "monoexp": {"te": [10, 20]},
    "three-pool-gre": {"te": [2, 4, 6, 8]},
    "mcr-mwi": {"flip_angles": [5, 20], "te": [2, 4, 6, 8], "tr": 40},
}


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import available, get
    from .models.registry import DIFFUSION_SPECS, diffusion_needs
    from .pipelines.diffusion import example_model

    def parameters(model: Any) -> None:
        for par in model.parameters:
            rel = " x data scale" if par.amplitude else ""
            print(
                f"    {par.name:<8} [{par.lower:g}, {par.upper:g}]{rel} {par.unit:<5} {par.description}"
            )

    for name, text in available().items():
        print(f"{name:<9} {text}")
        parameters(get(name, **_MODEL_EXAMPLES[name]))
    described = available(diffusion=True)
    for name in DIFFUSION_SPECS:  # built from a small example gradient table, to list parameters
        print(f"{name:<9} {described[name]}; {diffusion_needs(name)}")
        parameters(example_model(name))
    return 0


def _check_map_shape(flag: str, shape: tuple[int, ...], spatial: tuple[int, ...]) -> None:
    """A mask or B1 map must have the series' spatial shape (NIfTI order), checked before fitting."""
    if tuple(shape) == tuple(spatial):
        return
    hint = ""
    if len(spatial) >= 2 and tuple(shape) == tuple(spatial[1::-1]) + tuple(spatial[2:]):
        hint = " (it looks like (y, x) order; maps are read in NIfTI order (x, y[, z]))"
    raise ShapeError(
        f"{flag} has shape {tuple(shape)} but the series' images are {tuple(spatial)}{hint}"
    )


def _fit_settings(args: argparse.Namespace, dicom: Any = None) -> dict[str, Any]:
    """Acquisition settings from a DICOM series, then --protocol, then flags (each overriding
    the one before, with a warning where a value disagrees with the DICOM files); checked
    against the model."""
    from .io.protocol import load_protocol
    from .models.registry import check_name, check_settings

    key = _check_fit_flags(args)
    settings: dict[str, Any] = {}
    if args.protocol:
        settings.update(load_protocol(args.protocol))
        proto_model = settings.pop("model", None)
        settings.pop("description", None)
        if proto_model and check_name(str(proto_model)) != key:
            raise ParameterError(
                f"the protocol is for model {proto_model!r} but {args.model!r} was asked"
            )
    if settings.get("surrogate") is not None:
        # a protocol's surrogate file is found next to the protocol unless it exists from here
        sur = Path(str(settings["surrogate"]))
        if not sur.is_absolute() and not sur.exists():
            sur = Path(args.protocol).parent / sur
        if not sur.is_file():
            raise ParameterError(f"the protocol's surrogate file {settings['surrogate']} not found")
        settings["surrogate"] = str(sur)
    for name in ("ti", "te", "flip_angles", "tr"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.surrogate is not None:
        settings["surrogate"] = str(args.surrogate)
    if args.fixed is not None:  # per name over the protocol's
        if not isinstance(settings.get("fixed") or {}, dict):
            raise ParameterError("the protocol's 'fixed' must map parameter names to values")
        settings["fixed"] = {**(settings.get("fixed") or {}), **args.fixed}
    if dicom is not None:
        settings = _merge_dicom_settings(key, settings, dicom)
    check_settings(key, {**settings, "b1": args.b1})
    _check_tv_flags(args)
    return settings


def _merge_dicom_settings(key: str, given: dict[str, Any], dicom: Any) -> dict[str, Any]:
    """The model's required settings from the DICOM series where not given; a given value that
    disagrees with the files gets a warning (the given one is used)."""
    import numpy as np

    from .io.dicom import VARIABLES
    from .models.registry import SETTINGS, required_settings

    out = dict(given)
    for name in required_settings(key):
        if name not in VARIABLES:
            continue
        if name not in out:
            out.update(dicom.settings([name]))  # a DicomError names the tags looked at
            continue
        if name not in dicom.values:
            continue
        files = dicom.values[name]
        mine = np.atleast_1d(np.asarray(out[name], dtype=float))
        if name == "tr":
            files = files[:1] if np.allclose(files, files[0]) else files
        same = mine.shape == files.shape and np.allclose(mine, files, rtol=1e-3, atol=1e-2)
        if not same:
            flag = SETTINGS[name][0]
            warnings.warn(
                f"{flag} {_short(mine)} disagrees with the DICOM files' {_short(files)} "
                f"({dicom.sources[name]}, measurements sorted by {dicom.sorted_by}); using "
                f"{flag}",
                QmrkitWarning,
                stacklevel=2,
            )
    return out


def _short(values: Any) -> str:
    vals = [f"{float(v):g}" for v in list(values)[:12]]
    return ",".join(vals) + (",..." if len(values) > 12 else "")


def _check_fit_flags(args: argparse.Namespace) -> str:
    """The checks of a relaxometry fit request that need no data; returns the model key."""
    from .models.registry import check_name

    key = check_name(args.model)  # fail fast, before reading any data
    dwi_flags = [f"--{n}" for n in ("dwi", "bval", "bvec", "json") if getattr(args, n) is not None]
    if dwi_flags:
        raise ParameterError(
            f"model {key!r} fits an image series (--data); {', '.join(dwi_flags)} "
            f"{'is' if len(dwi_flags) == 1 else 'are'} for the diffusion models (see "
            "'qmrkit models')"
        )
    if args.data is None:
        raise ParameterError(
            f"model {key!r} needs --data (the image series: NIfTI, or a DICOM folder)"
        )
    if args.solver == "mcmc":
        raise ParameterError(
            "--solver mcmc is available for the diffusion models only; use lm, adam or dictionary"
        )
    if args.series is not None and not _is_dicom_input(args.data):
        raise ParameterError("--series picks a series of a DICOM --data folder")
    _check_dicom_out_flags(args)
    return key


def _is_dicom_input(path: Path | None) -> bool:
    if path is None or str(path).endswith((".nii", ".nii.gz")):
        return False  # NIfTI: no need to import the DICOM reader
    from .io.dicom import is_dicom

    return is_dicom(path)


def _check_dicom_out_flags(args: argparse.Namespace) -> None:
    """--send-to implies DICOM output; the DICOM packages must be importable (checked before
    any fitting)."""
    from ._optional import require

    if args.send_to and args.dicom_out is None:
        args.dicom_out = "both"
    if args.dicom_out:
        require("pydicom")
        if args.dicom_out in ("pmap", "both"):
            require("highdicom")
    if args.send_to:
        require("pynetdicom")


def _read_dicom_input(args: argparse.Namespace, key: str) -> Any:
    """Read a DICOM --data series, ordered by the variable the model needs (acquisition order
    when the images lack it but a flag or protocol gives it)."""
    from .io.dicom import SORTABLE, read_dicom
    from .io.protocol import load_protocol
    from .models.registry import required_settings

    need = [n for n in required_settings(key) if n in SORTABLE]
    sort_by = need[0] if need else "auto"
    given = getattr(args, sort_by, None) is not None if need else False
    if need and args.protocol and not given:
        given = sort_by in load_protocol(args.protocol)
    series = read_dicom(
        args.data,
        sort_by=sort_by,
        fallback="acquisition" if given else None,
        series_uid=args.series,
    )
    print(series.describe())
    return series


def _write_dicom_maps(
    args: argparse.Namespace,
    maps: dict[str, Any],
    units: dict[str, str],
    affine: Any,
    reference: Any,
    derivation: str,
) -> list[Path]:
    """--dicom-out / --send-to: write the maps as DICOM under OUT/dicom and send them."""
    if not args.dicom_out:
        return []
    from .io.dicom_out import write_dicom_maps

    kinds = ("pmap", "mr") if args.dicom_out == "both" else (args.dicom_out,)
    if reference is None:
        print(
            "note: the input is not DICOM: the DICOM maps get a new study of an anonymous "
            "patient (give a DICOM --data to file them with the scan)"
        )
    series = write_dicom_maps(
        args.out / "dicom",
        maps,
        units=units,
        affine=affine,
        reference=reference,
        kinds=kinds,
        derivation=derivation,
    )
    files = [f for s in series for f in s.files]
    print(f"DICOM: {len(series)} series, {len(files)} files in {args.out / 'dicom'}")
    if args.send_to:
        from .errors import ServiceError
        from .io.pacs import send_dicom

        report = send_dicom(files, args.send_to, calling_aet=args.calling_aet)
        print(
            f"sent {len(report.sent)} of {len(files)} DICOM files to {report.address} in "
            f"{report.seconds:.2f} s"
        )
        if report.failed:
            first = next(iter(report.failed.items()))
            raise ServiceError(
                f"the PACS {report.address} refused {len(report.failed)} file(s), e.g. "
                f"{first[0].name}: {first[1]}"
            )
    return files


def _named_maps(maps: dict[str, Any], names: dict[str, str], units: dict[str, str]) -> tuple:
    """Maps and units keyed by their file stems (``T1`` → ``T1map``)."""
    named = {names.get(k, k): v for k, v in maps.items()}
    return named, {names.get(k, k): units.get(k, "") for k in maps}


def _check_tv_flags(args: argparse.Namespace) -> None:
    if args.solver != "adam" and (args.tv is not None or args.loss is not None):
        raise ParameterError("--tv and --loss apply to --solver adam only")
    if getattr(args, "mcmc_preset", None) is not None and args.solver != "mcmc":
        raise ParameterError(
            f"--mcmc-preset {args.mcmc_preset} applies to --solver mcmc only (got --solver "
            f"{args.solver})"
        )
    if args.tv_dims is not None and args.tv is None:
        raise ParameterError("--tv-dims needs --tv")


def _process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere), so that the CLI's
    timings include the interpreter's own start-up and the imports before :func:`main`."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None


class _Stages:
    """Wall time per stage of a command: ``mark(name)`` charges the time since the last mark to
    ``name``. ``startup`` is the time from process start to :func:`main` (interpreter, site,
    ``qmrkit.cli``), when the platform tells it."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        age = _process_age()
        self.seconds: dict[str, float] = {} if age is None else {"startup": age}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now

    def record(self) -> dict[str, float]:
        """Seconds per stage and ``total`` (process start, or main, to now), rounded to ms."""
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["total"] = round(sum(self.seconds.values()), 3)
        return out

    def line(self) -> str:
        return "timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.record().items())


def _stages(args: argparse.Namespace) -> _Stages:
    """The command's stage timer (started by :func:`main`; a fresh one when called directly)."""
    st = getattr(args, "_stages", None)
    if st is None:
        st = args._stages = _Stages()
    return st


@contextlib.contextmanager
def _figure_worker(args: argparse.Namespace) -> Iterator[Any]:
    """:func:`_start_figure`'s worker for the duration of a command, cancelled on the way out
    (a figure not yet asked for is not drawn when the command fails)."""
    worker = _start_figure(args)
    try:
        yield worker
    finally:
        if worker is not None:
            worker.cancel()


def _start_figure(args: argparse.Namespace) -> Any:
    """The figure worker, started before the expensive work so that matplotlib's import overlaps
    it (None with --no-figure): the one :func:`main` started before parsing, else a new one."""
    early = getattr(args, "_early_figure", None)
    args._early_figure = None
    if args.no_figure:
        if early is not None:
            early.cancel()
        return None
    if early is not None:
        return early
    from ._figure import FigureWorker

    return FigureWorker()


def _early_figure(argv: Sequence[str]) -> Any:
    """A figure worker for what looks like ``qmrkit fit`` with a figure, started before the
    arguments are parsed (None otherwise).

    Parsing ``fit`` imports torch (the model names are checked against the registry, which imports
    the model classes): a worker started after parsing imports matplotlib after torch instead of
    meanwhile, and ``qmrkit fit`` then waits ≈ 0.3-0.6 s for the figure. The guess is cheap when
    wrong (a bad flag, an abbreviated ``--no-figure``): :func:`main` or :func:`_start_figure`
    cancels the worker, which ends it at once as it has no job.
    """
    words = [a for a in argv if not a.startswith("-")]
    if not words or words[0] != "fit" or "--no-figure" in argv:
        return None
    if any(a in ("-h", "--help", "--version") for a in argv):
        return None
    from ._figure import FigureWorker

    try:
        return FigureWorker()
    except OSError:  # cannot start a process now: the command starts one (and reports) later
        return None


def _finish(
    args: argparse.Namespace, written: list[Path], worker: Any, extra: dict[str, Any]
) -> None:
    """Wait for the figure, then record the timings in fit.json (and print them if asked)."""
    stages = _stages(args)
    if worker is not None:
        written.append(worker.wait())
        stages.mark("figure")
    record = stages.record()
    for name in ("fit.json", "mcmc.json"):  # one more small write: timings include the maps'
        path = args.out / name
        if path.exists():
            sidecar = json.loads(path.read_text())
            sidecar["Timings"] = {f"{k}_s": v for k, v in record.items()}
            path.write_text(json.dumps(sidecar, indent=2))
    if args.timings or args.verbose:
        print(stages.line())


def _fit_mask(args: argparse.Namespace, data: Any, spatial: tuple[int, ...]) -> tuple:
    """``--mask``: (mask for the fit or None, the fit.json "Mask" entry)."""
    if isinstance(args.mask, Path):
        from .io.nifti import load_nifti

        mask = load_nifti(args.mask)[0] != 0
        _check_map_shape("--mask", mask.shape, spatial)
        return mask, {"Method": "file", "File": str(args.mask), "VoxelCount": int(mask.sum())}
    from .pipelines.masking import resolve_mask

    mask, auto = resolve_mask(args.mask, data)
    if auto is None:
        return None, {"Method": "none", "VoxelCount": int(_n_voxels(spatial))}
    return mask, auto.sidecar()


def _n_voxels(shape: Sequence[int]) -> int:
    n = 1
    for k in shape:
        n *= int(k)
    return n


def _mask_line(info: dict[str, Any]) -> str:
    if info["Method"] != "auto":
        return f"mask: {info['Method']}, {info['VoxelCount']} voxels"
    if not info["BackgroundFound"]:
        return f"mask: auto found no background, all {info['VoxelCount']} voxels fitted"
    return (
        f"mask: auto, threshold {info['Threshold']:.4g} (Otsu on the root-sum-of-squares), "
        f"{info['VoxelCount']} voxels"
    )


def _cmd_fit(args: argparse.Namespace) -> int:
    from .models.registry import is_diffusion

    if is_diffusion(args.model):
        return _cmd_fit_dwi(args)
    key = _check_fit_flags(args)
    with _figure_worker(args) as worker:
        return _fit_series(args, key, worker)


def _fit_series(args: argparse.Namespace, key: str, worker: Any) -> int:
    import torch

    from . import fit
    from .io.nifti import load_nifti
    from .models import get

    stages = _stages(args)
    stages.mark("import")
    dicom = _read_dicom_input(args, key) if _is_dicom_input(args.data) else None
    settings = _fit_settings(args, dicom)
    if dicom is not None:
        data, affine, header = dicom.data, dicom.affine, None
    else:
        data, affine, header = load_nifti(args.data, with_header=True)
    if data.ndim < 2:
        raise ShapeError(
            f"--data {args.data} has shape {data.shape}; a series needs image axes and a "
            "measurement axis last (x, y[, z], n_meas)"
        )
    spatial = data.shape[:-1]
    if args.phase is not None:
        data = _with_phase(args, data)
    b1 = None
    if args.b1:
        b1, _ = load_nifti(args.b1)
        _check_map_shape("--b1", b1.shape, spatial)
    model = get(args.model, **settings, **({"b1": b1} if b1 is not None else {}))
    _check_data_kind(args, model, data)
    if model.n_measurements != data.shape[-1]:
        count = f"{model.n_measurements} {model.measurement_axis}"
        if hasattr(model, "n_fa") and hasattr(model, "n_te"):  # MCR-MWI: say how it is made up
            count = (
                f"{model.n_fa} flip angles x {model.n_te} echo times = {model.n_measurements} "
                "volumes (flip-angle-major: index = i_fa*n_te + i_te)"
            )
        raise ShapeError(
            f"--data has {data.shape[-1]} measurements (last axis of shape {data.shape}) but the "
            f"{model.name} model has {count}; give one setting per image, measurement axis last"
        )
    if hasattr(model, "surrogate") and model.surrogate is None:
        warnings.warn(
            f"{model.name} without --surrogate simulates EPG-X directly in every iteration: "
            "exact but slow (of the order of 10 s per voxel on one CPU core); train one with "
            "qmrkit.models.myelin.train_mcr_mwi_surrogate(tr) for large volumes",
            QmrkitWarning,
            stacklevel=2,
        )
    stages.mark("read")
    mask, mask_info = _fit_mask(args, data, spatial)
    stages.mark("mask")
    dtype = torch.float64 if args.float64 else torch.float32
    common = {"mask": mask, "device": args.device, "dtype": dtype}
    kw = {"max_iter": args.max_iter} if args.max_iter else {}
    t0 = time.perf_counter()
    if args.solver == "lm":
        result = fit.lm(model, data, progress=args.progress, **common, **kw)
    elif args.solver == "adam":
        from .pipelines.diffusion import tv_regularizers

        regs = tv_regularizers(model, args.tv, args.tv_dims)
        result = fit.adam(
            model,
            data,
            loss=args.loss or "l2",
            regularizers=regs,
            progress=args.progress,
            **common,
            **kw,
        )
    else:
        result = fit.dictionary_search(model, data, **common)
    stages.mark("fit")
    if worker is not None:  # renders while the maps are written
        _submit_figure(worker, args.out, model, result.maps, result.units, result.solver)
    extra: dict[str, Any] = {"Input": str(args.data), "Acquisition": settings, "Mask": mask_info}
    if getattr(model, "surrogate", None) is not None:
        extra["Surrogate"] = _surrogate_record(model.surrogate, settings.get("surrogate"))
    if dicom is not None:
        extra["DicomSeries"] = {
            "SeriesInstanceUID": dicom.series_uid,
            "SortedBy": dicom.sorted_by,
            "Sources": dicom.sources,
        }
    written = result.save(
        args.out,
        affine=affine,
        like=header,  # keep the input's qform/sform codes
        extra_sidecar=extra,
    )
    maps, units = _named_maps(result.maps, result.map_names, result.units)
    written += _write_dicom_maps(
        args, maps, units, affine, dicom, f"qmrkit {model.name} fit ({result.solver})"
    )
    stages.mark("write")
    print(_mask_line(mask_info))
    print(result.summary())
    _finish(args, written, worker, extra)
    print(f"wrote {len(written)} files to {args.out} in {time.perf_counter() - t0:.2f} s")
    return 0


def _surrogate_record(sur: Any, path: Any) -> dict[str, Any]:
    """What fit.json records of a surrogate: file, fixed settings, ranges, held-out error."""
    rec: dict[str, Any] = {
        "File": None if path is None else str(path),
        "Acquisition": dict(sur.acquisition),
        "Ranges": {r.name: [r.lower, r.upper, r.unit] for r in sur.ranges},
    }
    if sur.report is not None:  # relative to the peak of what it learned (see docs/myelin.md)
        rec["HeldOutRelError"] = {
            "max": sur.report.max_rel_error,
            "p99": sur.report.p99_rel_error,
            "median": sur.report.median_rel_error,
        }
    return rec


def _with_phase(args: argparse.Namespace, magnitude: Any) -> Any:
    """``--data`` magnitude and ``--phase`` (radians) -> the complex64 series."""
    import numpy as np

    from .io.nifti import load_nifti

    if _is_dicom_input(args.data) or np.iscomplexobj(magnitude):
        raise ParameterError(
            "--phase needs --data to be a real magnitude NIfTI (a complex --data already has "
            "its phase)"
        )
    phase, _ = load_nifti(args.phase)
    if phase.shape != magnitude.shape:
        raise ShapeError(
            f"--phase has shape {phase.shape} but --data has {magnitude.shape}; give one phase "
            "image per magnitude image"
        )
    if np.nanmax(np.abs(phase)) > 2 * np.pi * 1.001:
        raise ParameterError(
            f"--phase must be in radians, but its values reach {np.nanmax(np.abs(phase)):.4g} "
            "(scanner phase in integer units: rescale to [-pi, pi] first)"
        )
    return (magnitude * np.exp(1j * phase.astype(np.float64))).astype(np.complex64)


def _check_data_kind(args: argparse.Namespace, model: Any, data: Any) -> None:
    """Complex models need complex data and real models real data (one clear message each)."""
    import numpy as np

    wants = bool(getattr(model, "complex_data", False))
    has = bool(np.iscomplexobj(data))
    if wants and not has:
        raise ShapeError(
            f"model {model.name!r} fits complex GRE data, but --data {args.data} is real "
            f"({data.dtype}); give a complex NIfTI (complex64, magnitude and phase) or the "
            "magnitude as --data with --phase PHASE.nii.gz (radians)"
        )
    if has and not wants:
        raise ShapeError(
            f"--data {args.data} is complex ({data.dtype}) but model {model.name!r} fits real "
            "data; give the magnitude images"
        )


def _figure_names(model: Any, maps: dict) -> list[str]:
    """Derived maps first, then the parameters."""
    derived = [k for k in maps if k not in model.parameter_names]
    return derived + [k for k in model.parameter_names if k in maps]


def _submit_figure(
    worker: Any, out: Path, model: Any, maps: dict, units: dict, solver: str
) -> None:
    """Hand ``maps.png`` to the figure worker."""
    worker.submit(
        out / "maps.png",
        maps,
        units=units,
        names=_figure_names(model, maps),
        title=f"{model.name} ({solver})",
    )


def _nifti_shape(path: Path) -> tuple[int, ...]:
    """The image shape from the NIfTI header alone (the data are not read)."""
    import nibabel as nib

    from .errors import DataFileError

    try:
        return tuple(int(n) for n in nib.load(str(path)).shape)
    except Exception as exc:  # nibabel raises many types for files that are not NIfTI
        raise DataFileError(f"cannot read NIfTI file {path}: {type(exc).__name__}: {exc}") from exc


def _check_dwi_files(args: argparse.Namespace, key: str) -> None:
    """Everything about a diffusion request that can be checked without reading the DWI data:
    flags, counts of b-values/b-vectors/protocol rows against the volumes, timing the model
    needs, TV names, the mask's shape."""
    from .io.dwi import (
        B0_THRESHOLD,
        check_gradients,
        read_bval,
        read_bvec,
        read_dwi_protocol,
        read_dwi_sidecar,
    )
    from .models.registry import diffusion_spec
    from .pipelines.diffusion import check_request, check_timing, example_model, tv_regularizers

    spec = diffusion_spec(key)
    other = [
        flag
        for flag, value in (
            ("--data", args.data),
            ("--ti", args.ti),
            ("--te", args.te),
            ("--fa", args.flip_angles),
            ("--tr", args.tr),
            ("--b1", args.b1),
            ("--series", args.series),
            ("--phase", args.phase),
            ("--surrogate", args.surrogate),
            ("--fix", args.fixed),
        )
        if value is not None
    ]
    if other:
        raise ParameterError(
            f"model {key!r} reads DWI files (--dwi, --bval, --bvec); it does not use "
            f"{', '.join(other)}"
        )
    if args.dwi is None:
        raise ParameterError(f"model {key!r} needs --dwi (the diffusion-weighted series, 4D NIfTI)")
    if args.bvec is None:
        raise ParameterError(f"model {key!r} needs --bvec (FSL b-vectors file, 3 rows)")
    _check_tv_flags(args)
    shape = _nifti_shape(args.dwi)
    if len(shape) != 4:
        raise ShapeError(f"--dwi {args.dwi} must be 4D (x, y, z, volumes), got shape {shape}")
    n = shape[-1]
    proto = read_dwi_protocol(args.protocol, n) if args.protocol else {}
    side = read_dwi_sidecar(args.json, n) if args.json else {}
    if args.bval is None and "b" not in proto:
        raise ParameterError(
            f"model {key!r} needs --bval (FSL b-values file, s/mm²) or a --protocol with a b column"
        )
    b = read_bval(args.bval) if args.bval is not None else proto["b"]
    g = read_bvec(args.bvec)
    if b.size != n or g.shape[0] != n:
        raise ShapeError(
            f"--dwi has {n} volumes but there are {b.size} b-values and {g.shape[0]} b-vectors; "
            "every volume needs one of each"
        )
    source = "--bval/--bvec" if args.bval is not None else "--protocol/--bvec"
    check_gradients(b, g, source=source)  # b >= 0, a b = 0 volume, unit vectors
    timing = {k: proto.get(k, side.get(k)) for k in ("small_delta", "big_delta")}
    check_request(
        key,
        solver=args.solver,
        tv=args.tv,
        has_small_delta=timing["small_delta"] is not None,
        has_big_delta=timing["big_delta"] is not None,
    )
    check_timing(b, timing, spec.needs, B0_THRESHOLD)
    if args.tv:
        tv_regularizers(example_model(key), args.tv, args.tv_dims)  # unknown names fail here
    if isinstance(args.mask, Path):
        _check_map_shape("--mask", _nifti_shape(args.mask), shape[:-1])


def _cmd_fit_dwi(args: argparse.Namespace) -> int:
    """``qmrkit fit dti|nexi --dwi ... --bval ... --bvec ...`` through
    :func:`qmrkit.pipelines.diffusion_maps`."""
    from .models.registry import check_name

    key = check_name(args.model)
    _check_dwi_files(args, key)
    _check_dicom_out_flags(args)
    with _figure_worker(args) as worker:
        return _fit_dwi(args, key, worker)


def _fit_dwi(args: argparse.Namespace, key: str, worker: Any) -> int:
    import torch

    from .io.dwi import load_dwi
    from .pipelines.diffusion import diffusion_maps

    stages = _stages(args)
    stages.mark("import")
    dwi = load_dwi(args.dwi, args.bval, args.bvec, protocol=args.protocol, json=args.json)
    stages.mark("read")
    mask, mask_info = _fit_mask(args, dwi.data, dwi.data.shape[:-1])
    stages.mark("mask")
    t0 = time.perf_counter()
    maps = diffusion_maps(
        dwi,
        key,
        mask=mask,
        solver=args.solver,
        tv=args.tv,
        tv_dims=args.tv_dims,
        loss=args.loss,
        max_iter=args.max_iter,
        device=args.device,
        dtype=torch.float64 if args.float64 else torch.float32,
        progress=args.progress,
        mcmc_preset=args.mcmc_preset,
    )
    stages.mark("fit")
    if worker is not None:  # renders while the maps are written
        _submit_figure(worker, args.out, maps.model, maps.maps, maps.result.units, args.solver)
    inputs = {"dwi": args.dwi, "bval": args.bval, "bvec": args.bvec}
    inputs.update({k: getattr(args, k) for k in ("protocol", "json") if getattr(args, k)})
    if isinstance(args.mask, Path):
        inputs["mask"] = args.mask
    files = {k: str(v) for k, v in inputs.items()}
    extra = {"Input": str(args.dwi), "InputFiles": files, "Mask": mask_info}
    written = maps.save(
        args.out,
        affine=dwi.affine,
        like=dwi.header,  # keep the DWI's qform/sform codes
        extra_sidecar=extra,
    )
    named, units = _named_maps(maps.maps, maps.model.map_names, maps.result.units)
    written += _write_dicom_maps(
        args, named, units, dwi.affine, None, f"qmrkit {key} fit ({args.solver})"
    )
    stages.mark("write")
    print(_mask_line(mask_info))
    print(maps.summary())
    _finish(args, written, worker, extra)
    print(f"wrote {len(written)} files to {args.out} in {time.perf_counter() - t0:.2f} s")
    return 0


def _cmd_mrf(args: argparse.Namespace) -> int:
    import numpy as np

    from .io import load_nifti
    from .io.geometry import affines_match, map_from_nifti
    from .io.mrd import read_mrd
    from .mrf import Dictionary, log_grid, schedule_from_header
    from .pipelines import mrf_image_size, mrf_maps

    t0 = time.perf_counter()
    _check_dicom_out_flags(args)
    scan = read_mrd(args.scan)
    im_size = mrf_image_size(scan)  # a trajectory that disagrees with the header fails here
    schedule = schedule_from_header(scan.header)
    b1 = None
    if args.b1:
        b1, b1_affine = load_nifti(args.b1)  # NIfTI order (x, y[, z]), as mrf_maps takes it
        map_from_nifti(b1, im_size, f"the B1 map {args.b1}")  # shape check before the dictionary
        if scan.geometry is not None and not affines_match(b1_affine, scan.affine):
            raise QmrkitError(
                f"the B1 map {args.b1} is on another voxel grid than the scan (orientation, voxel "
                f"size or position differ: B1 affine rows {np.round(b1_affine[:3], 2).tolist()}, the "
                f"scan's {np.round(scan.affine[:3], 2).tolist()})"
            )
    if args.dictionary:
        dictionary = Dictionary.load(args.dictionary, device=args.device)
    else:
        from .pipelines import b1_grid

        b1_values = (1.0,) if b1 is None else b1_grid(b1, args.b1_step)
        t = time.perf_counter()
        dictionary = Dictionary.build(
            schedule,
            t1=log_grid(10, 4000, args.dictionary_step),
            t2=log_grid(1, 500, args.dictionary_step),
            b1=b1_values,
            device=args.device,
            keep_atoms=False,
            progress=args.progress,
        )
        print(
            f"dictionary: {dictionary.n_atoms} atoms (rank {dictionary.rank}) in {time.perf_counter() - t:.1f} s"
        )
    maps = mrf_maps(
        scan,
        dictionary=dictionary,
        b1_map=b1,
        schedule=schedule,
        n_iter=args.n_iter,
        device=args.device,
    )
    written = maps.save(args.out, affine=scan.affine)
    mrf_names = {"T1": "T1map", "T2": "T2map", "PD": "M0map", "B1": "B1map"}
    mrf_units = {"T1": "ms", "T2": "ms", "PD": "a.u.", "B1": "fraction"}
    named, units = _named_maps(
        {k: v for k, v in maps.maps().items() if k in mrf_names}, mrf_names, mrf_units
    )
    written += _write_dicom_maps(
        args, named, units, scan.affine, scan.header, "qmrkit MR fingerprinting"
    )
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in maps.stages.items())
    print(
        f"mrf: {'x'.join(str(n) for n in maps.t1.shape)} maps; {stages}; wrote {len(written)} "
        f"files to {args.out} ({time.perf_counter() - t0:.1f} s in all)"
    )
    return 0


def _learn_parser(sub: Any) -> None:
    """``qmrkit learn train|eval``: unrolled networks with memory-efficient training."""
    lp = sub.add_parser(
        "learn",
        help="train or evaluate unrolled reconstruction networks (qmrkit.learn)",
        description="Train or evaluate MoDL-style unrolled networks on Cartesian multi-coil data "
        "(an .npz file with kspace, maps, masks, targets, or synthetic phantoms).",
    )
    lsub = lp.add_subparsers(dest="learn_command", metavar="ACTION", required=True)
    for name in ("train", "eval"):
        a = lsub.add_parser(
            name,
            help=f"{name} a network",
            description="Train an unrolled network; checkpoints and metrics.json go to --out."
            if name == "train"
            else "Evaluate a checkpoint against zero-filled and CG-SENSE baselines.",
        )
        a.add_argument(
            "--data",
            type=_input_file,
            help="dataset .npz, or a fully sampled Cartesian MRD file (.h5/.mrd, undersampled "
            "with --accel) (default: synthetic phantoms)",
        )
        a.add_argument(
            "--val-data", type=_input_file, help="validation .npz or .h5/.mrd (train only)"
        )
        a.add_argument("--n", type=_positive_int, default=32, help="synthetic samples (default 32)")
        a.add_argument(
            "--n-val",
            type=_positive_int,
            default=8,
            help="synthetic validation samples (default 8)",
        )
        a.add_argument(
            "--kind",
            choices=("2d", "3d", "2d+t"),
            default="2d",
            help="synthetic data: 2D slices, 3D volumes or 2D+time (default 2d)",
        )
        a.add_argument(
            "--shape",
            type=_positive_int,
            nargs="+",
            default=[32, 32],
            help="synthetic image shape (default 32 32)",
        )
        a.add_argument("--coils", type=_positive_int, default=4, help="synthetic coils (default 4)")
        a.add_argument(
            "--accel", type=_positive, default=4.0, help="undersampling factor (default 4)"
        )
        a.add_argument(
            "--noise", type=_nonnegative, default=0.02, help="relative k-space noise (default 0.02)"
        )
        a.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        a.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cpu)")
        a.add_argument(
            "--out",
            type=Path,
            required=name == "train",
            help="output folder (checkpoints, metrics.json)"
            if name == "train"
            else "folder for eval.json (optional)",
        )
        if name == "train":
            a.add_argument(
                "--unrolls", type=_positive_int, default=5, help="unrolled iterations (default 5)"
            )
            a.add_argument(
                "--memory",
                choices=("standard", "checkpoint", "reversible", "hybrid"),
                default="checkpoint",
                help="how the backward pass gets each unroll's input: standard (stored), "
                "checkpoint (recomputed, default), reversible (inverted), hybrid",
            )
            a.add_argument(
                "--dc",
                choices=("cg", "gradient"),
                default="cg",
                help="data consistency: cg (exact, default) or gradient step",
            )
            a.add_argument(
                "--channels", type=_positive_int, default=32, help="denoiser channels (default 32)"
            )
            a.add_argument(
                "--layers", type=_positive_int, default=5, help="denoiser layers (default 5)"
            )
            a.add_argument(
                "--conv",
                choices=("full", "separable"),
                default="full",
                help="3D convolutions: full or (2+1)D separable (default full)",
            )
            a.add_argument(
                "--spectral-norm",
                action="store_true",
                help="spectrally normalise ResidualCNN (needed by reversible/hybrid)",
            )
            a.add_argument(
                "--denoiser",
                choices=("residual", "coupling"),
                default="residual",
                help="ResidualCNN (default; reversible/hybrid need --spectral-norm) or "
                "CouplingCNN (exactly invertible: the cheapest reversible/hybrid steps, a weaker "
                "denoiser)",
            )
            a.add_argument(
                "--couplings",
                type=_positive_int,
                default=2,
                help="couplings of --denoiser coupling (default 2)",
            )
            a.add_argument("--unshared", action="store_true", help="separate weights per unroll")
            a.add_argument(
                "--lam", type=_positive, default=0.05, help="initial CG weight λ (default 0.05)"
            )
            a.add_argument(
                "--cg-iter",
                type=_positive_int,
                default=10,
                help="CG iterations per data-consistency step (default 10)",
            )
            a.add_argument(
                "--epochs", type=_positive_int, default=10, help="training epochs (default 10)"
            )
            a.add_argument(
                "--lr", type=_positive, default=1e-3, help="Adam learning rate (default 1e-3)"
            )
            a.add_argument(
                "--loss",
                choices=("l1", "l2", "ssim"),
                default="l2",
                help="training loss (default l2)",
            )
            a.add_argument(
                "--batch-size", type=_positive_int, default=1, help="samples per step (default 1)"
            )
            a.add_argument(
                "--resume",
                action="store_true",
                help="continue from OUT/last.pt or OUT/last.safetensors (if both: the newer)",
            )
            a.add_argument(
                "--checkpoint-format",
                choices=("torch", "safetensors"),
                default="torch",
                help="last/best checkpoints as .pt (torch.save, default) or .safetensors "
                "(no pickle; needs pip install 'qmrkit[learn]')",
            )
            _add_common(a)
        else:
            a.add_argument(
                "--checkpoint",
                type=_input_file,
                required=True,
                help="best.pt or last.pt, or best.safetensors or last.safetensors",
            )
            _add_common(a, progress=False)


def _cmd_learn(args: argparse.Namespace) -> int:
    from .learn._cli import run

    return run(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    import errno
    import socket

    from .serve import Limits, run_server, tls_context
    from .serve.store import DirectoryStore

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ParameterError("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        raise ParameterError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    if args.store is not None:
        _check_output_folder(args.store, "--store")
    ctx = (
        tls_context(args.tls_cert, args.tls_key, args.tls_ca, allow_anonymous=args.allow_anonymous)
        if args.tls_cert
        else None
    )
    store = DirectoryStore(args.store) if args.store else None
    if (args.scan_timeout or args.scan_memory) and not args.isolate:
        raise ParameterError("--scan-timeout and --scan-memory need --isolate")
    import importlib

    for name in args.pipelines_module:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ParameterError(f"--pipelines-module {name}: cannot import it ({exc})") from None
    try:
        run_server(
            args.host,
            args.port,
            store=store,
            max_concurrent=args.max_concurrent,
            max_connections=args.max_connections,
            ssl_context=ctx,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            grace_s=args.grace,
            limits=Limits(
                read_timeout=args.read_timeout,
                min_rate_bytes_s=args.min_rate,
                session_deadline_s=args.session_deadline,
            ),
            isolate=args.isolate,
            scan_time_budget_s=args.scan_timeout,
            scan_memory_budget_bytes=int(args.scan_memory * 2**20) if args.scan_memory else None,
            pipeline_modules=tuple(args.pipelines_module),
            send_to=args.send_to,
            calling_aet=args.calling_aet,
            dicom_kind=args.dicom_kind,
            pacs_options={"retries": args.pacs_retries},
        )
    except OSError as exc:
        # binding is the one OSError a user causes here (busy port, privileged port, bad host)
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL) or isinstance(
            exc, socket.gaierror
        ):
            ports = f"{args.port}" + (
                f" or metrics {args.metrics_host} port {args.metrics_port}"
                if args.metrics_port
                else ""
            )
            gai = isinstance(exc, socket.gaierror)  # its errno is an EAI_* code
            why = exc.strerror if gai or not exc.errno else os.strerror(exc.errno)
            raise ParameterError(f"cannot listen on {args.host} port {ports}: {why}") from exc
        raise
    return 0


def _parse_params(items: list[str]) -> dict[str, Any]:
    """``--param KEY=JSON`` values; a bare word (``kind=T2star``) is a string."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"--param {item!r}: expected KEY=JSON, e.g. ti=[100,200]")
        try:
            params[key.strip()] = json.loads(val)
        except json.JSONDecodeError as exc:
            # JSON-looking text that does not parse is a mistake, not a string to send
            if val[:1] in '[{"' or val[:1].isdigit() or val[:1] in "-.":
                raise ParameterError(
                    f"--param {item!r}: the value is not valid JSON ({exc.msg}); lists need "
                    "brackets, e.g. ti=[100,200]"
                ) from None
            params[key.strip()] = val
    return params


def _cmd_send(args: argparse.Namespace) -> int:
    import numpy as np

    from ._optional import require
    from .errors import DataFileError
    from .pipelines import noise_statistics
    from .serve import client_tls_context, read_mrd_file, save_reply, send_scan
    from .serve.client import header_from_images

    ismrmrd = require("ismrmrd")
    params = _parse_params(args.param)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ParameterError("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        raise ParameterError("--tls-cert needs --tls-ca (the CA that signed the server)")
    header, acqs, images = read_mrd_file(args.scan)
    if header is None:
        if acqs:
            raise DataFileError(
                f"{args.scan} has raw data but no XML header; raw data cannot be "
                "reconstructed without its header"
            )
        if not images:
            raise DataFileError(f"{args.scan} has no XML header, acquisitions or images")
        header = header_from_images(images)
        print(
            f"{args.scan} has no XML header: sending a minimal one built from its "
            f"{len(images)} images (acquisition settings from --param)"
        )
    query = args.config.strip().lower().removesuffix(".xml") == "dependency-query"
    if query:  # the question is about the header's subject/device/session; data is not needed
        acqs, images = [], []
    sigma = None
    if args.compress is not None:
        noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
        if not noise:
            raise ParameterError(
                "--compress needs noise scans in the file (acquisitions flagged as noise)"
            )
        sigma = noise_statistics(np.concatenate([a.data for a in noise], axis=1))["sigma"]
    if args.tls_server_name and not args.tls_ca:
        raise ParameterError("--tls-server-name needs --tls-ca (it names the server's certificate)")
    ctx = client_tls_context(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_ca else None
    reply = send_scan(
        args.host,
        args.port,
        retries=args.retries,
        config=args.config,
        header_xml=header,
        acquisitions=acqs,
        images=images,
        parameters=params or None,
        compress=args.compress,
        noise_sigma=sigma,
        ssl_context=ctx,
        server_hostname=args.tls_server_name,
        progress=None,
    )
    for line in reply.texts:
        print(f"server: {line}")
    written = save_reply(reply, args.out, header_xml=header)
    if query and reply.dependencies is not None:
        path = Path(args.out) / "dependencies.json"
        path.write_text(json.dumps(reply.dependencies, indent=2) + "\n")
        written.append(path)
        print(f"dependencies: {json.dumps(reply.dependencies)}")
    ratio = reply.bytes_raw / max(reply.bytes_sent, 1)
    print(
        f"sent {reply.bytes_sent:,} bytes ({ratio:.2f}x smaller than raw), received {len(reply.images)} "
        f"images in {reply.seconds:.2f} s; wrote {len(written)} files to {args.out}"
    )
    return 1 if reply.errors else 0


@contextlib.contextmanager
def _warnings_as_lines(prog: str) -> Iterator[None]:
    """Show qmrkit warnings as one line ``prog: warning: ...`` when they happen (others as usual)."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if issubclass(category, QmrkitWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("default", QmrkitWarning)
        warnings.showwarning = show
        yield


def _os_error_line(exc: OSError) -> str:
    """``[Errno 20] Not a directory: 'a/b'`` -> ``Not a directory: a/b``."""
    if exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return exc.strerror or str(exc) or type(exc).__name__


_HANDLERS = {
    "fit": _cmd_fit,
    "models": _cmd_models,
    "recon": _cmd_recon,
    "serve": _cmd_serve,
    "send": _cmd_send,
    "mrf": _cmd_mrf,
    "learn": _cmd_learn,
}


def _cmd_batch(args: argparse.Namespace) -> int:
    from .dist.cli import cmd_batch

    return cmd_batch(args)


_HANDLERS["batch"] = _cmd_batch


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qmrkit`` console script; returns the exit status (see the module
    docstring: 2 and one line for user mistakes, the traceback for bugs)."""
    from ._threads import configure_process

    stages = _Stages()
    # before anything imports torch: OpenMP reads its wait policy when its runtime starts
    configure_process()
    argv = sys.argv[1:] if argv is None else list(argv)
    early = _early_figure(argv)  # first: its matplotlib import overlaps everything below
    parser = _parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _run(parser, argv, stages, early)
    finally:
        if early is not None:
            early.cancel()  # no-op once the command has waited for its figure


def _run(parser: argparse.ArgumentParser, argv: list[str], stages: _Stages, early: Any) -> int:
    """:func:`main` after the start-up: parse the arguments and run the command."""
    from ._progress import configure_logging, set_progress_default
    from ._threads import configure_process

    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a one-line usage error (status 2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:  # e.g. 'qmrkit -v'
        parser.print_help(sys.stderr)
        return 2
    prog = f"qmrkit {args.command}"
    args._stages = stages
    args._early_figure = early
    configure_logging(args.verbose, quiet=args.quiet)
    if args.quiet and hasattr(args, "progress"):
        args.progress = False
    previous = set_progress_default(False if args.quiet else None)
    try:
        with _warnings_as_lines(prog):
            configure_process(getattr(args, "threads", None))  # --threads, once parsed
            if getattr(args, "out", None) is not None:
                _check_output_folder(args.out)
            return _HANDLERS[args.command](args)
    except BrokenPipeError:
        # stdout closed early (e.g. 'qmrkit models | head'): not an error worth a line
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (QmrkitError, OSError) as exc:
        # a user mistake or an environment problem (QmrkitError first: DataFileError is an
        # OSError too): one clear line, no traceback from deep inside torch
        if args.verbose >= 2:
            import traceback

            traceback.print_exc()
        text = str(exc) if isinstance(exc, QmrkitError) else _os_error_line(exc)
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        set_progress_default(previous)


def entry() -> None:
    """The ``qmrkit`` console script: :func:`main`, then a fast process exit.

    After ``import torch`` the interpreter's own shutdown (tearing down thousands of modules and
    objects) takes 0.4-0.8 s, a quarter of a whole ``qmrkit fit``. Everything a normal exit does
    that matters for the command is done here explicitly, in the same order as CPython's
    finalisation: wait for other non-daemon threads, run the ``atexit`` handlers (logging's
    shutdown, temporary folders, multiprocessing children), flush stdout and stderr; then
    :func:`os._exit` skips only the teardown of the module objects (``threading._shutdown`` and
    ``atexit._run_exitfuncs`` are the functions CPython's own exit calls). Exceptions escaping
    :func:`main` (bugs: status 1 with the traceback) take the ordinary path. :func:`main` itself
    returns normally, so calling it in-process (tests, ``qmrkit.cli.main([...])``) is unchanged.
    """
    import atexit
    import threading

    status = main()
    status = 0 if status is None else int(status)  # as sys.exit() would read it
    # what the interpreter does first at exit: threading's exit callbacks (they stop idle
    # concurrent.futures workers), then wait for every non-daemon thread
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None and threading.current_thread() is threading.main_thread():
        shutdown()
    else:  # not CPython's threading: join what can be joined
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 - the handlers a normal exit runs (logging.shutdown...)
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left before the last line: as main() reports it
        status = 141
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(status)
