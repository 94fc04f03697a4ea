"""The ``qmrkit`` command line: ``qmrkit --help`` lists the subcommands."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import QmrkitError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qmrkit",
        description="Quantitative MRI maps from image series and raw data, on CPU or GPU.",
    )
    p.add_argument("--version", action="version", version=f"qmrkit {__version__}")
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    f = sub.add_parser(
        "fit",
        help="fit a signal model to every voxel of an image series (NIfTI)",
        description="Fit a signal model to every voxel of a NIfTI image series "
        "(measurement axis last) and write NIfTI maps, a PNG figure and a JSON sidecar.",
    )
    f.add_argument("model", help="model name (see 'qmrkit models'), e.g. molli, vfa, t2, t2star")
    f.add_argument(
        "--data", required=True, type=Path, help="image series, NIfTI (*spatial, n_meas)"
    )
    f.add_argument("--ti", type=_floats, help="inversion times in ms, e.g. 100,180,260,...")
    f.add_argument("--te", type=_floats, help="echo times in ms")
    f.add_argument(
        "--fa", "--flip-angles", dest="flip_angles", type=_floats, help="flip angles in degrees"
    )
    f.add_argument("--tr", type=float, help="repetition time in ms")
    f.add_argument(
        "--b1", type=Path, help="B1 map (fraction of nominal), NIfTI, for models that use one"
    )
    f.add_argument("--protocol", type=Path, help="YAML file with the acquisition settings")
    f.add_argument("--mask", type=Path, help="mask NIfTI (non-zero voxels are fitted)")
    f.add_argument(
        "--solver",
        choices=("lm", "adam", "dictionary"),
        default="lm",
        help="lm: Levenberg-Marquardt (default); adam: whole-volume gradient descent; "
        "dictionary: dictionary search only",
    )
    f.add_argument(
        "--loss", choices=("l1", "l2", "huber"), default="l2", help="loss for --solver adam"
    )
    f.add_argument(
        "--tv",
        type=float,
        default=0.0,
        help="total-variation weight for --solver adam (on all parameters except amplitudes)",
    )
    f.add_argument("--max-iter", type=int, help="maximum iterations")
    f.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    f.add_argument("--float64", action="store_true", help="compute in float64 (default float32)")
    f.add_argument("--out", required=True, type=Path, help="output folder")
    f.add_argument("--no-figure", action="store_true", help="do not write the PNG figure")
    f.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when the terminal is interactive)",
    )

    sub.add_parser("models", help="list the signal models and their parameters")
    _add_recon_parser(sub)
    return p


def _add_recon_parser(sub: Any) -> None:
    r = sub.add_parser(
        "recon",
        help="reconstruct images from an ISMRMRD/MRD raw-data file",
        description="Reconstruct an ISMRMRD/MRD HDF5 raw scan (Cartesian or non-Cartesian) by "
        "CG-SENSE, TV-regularised SENSE or gridding, with noise prewhitening and automatic coil "
        "maps (ESPIRiT or Walsh); write NIfTI magnitude/phase, a PNG, a JSON sidecar and the "
        "images as ISMRMRD.",
    )
    r.add_argument("scan", type=Path, help="ISMRMRD/MRD HDF5 file (.h5)")
    r.add_argument("--method", choices=("sense", "tv", "gridding"), default="sense")
    r.add_argument(
        "--lam",
        type=float,
        help="regularisation weight (SENSE: Tikhonov, default 0; TV: default 1e-3; scale-free)",
    )
    r.add_argument("--max-iter", type=int, help="solver iterations (SENSE 30, TV 100)")
    r.add_argument(
        "--maps",
        choices=("auto", "espirit", "walsh"),
        default="auto",
        help="coil maps (auto: ESPIRiT for Cartesian, Walsh otherwise)",
    )
    r.add_argument("--virtual-coils", type=int, help="compress to this many coils first (SVD)")
    r.add_argument("--no-prewhiten", action="store_true", help="skip noise prewhitening")
    r.add_argument("--dataset", default="dataset", help="dataset group in the file")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    r.add_argument("--out", required=True, type=Path, help="output folder")
    r.add_argument("--no-figure", action="store_true", help="do not write the PNG figure")
    r.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when the terminal is interactive)",
    )


def _cmd_recon(args: argparse.Namespace) -> int:
    from .errors import QmrkitWarning
    from .io.mrd import read_mrd, write_mrd_images
    from .recon import reconstruct

    t0 = time.perf_counter()
    scan = read_mrd(args.scan, dataset=args.dataset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
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
    for w in caught:
        if issubclass(w.category, QmrkitWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    result.settings["input"] = str(args.scan)
    import numpy as np

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


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import available, get

    examples = {
        "molli": {"ti": [100, 1000]},
        "ir": {"ti": [100, 1000]},
        "vfa": {"flip_angles": [3, 15], "tr": 15},
        "t2": {"te": [10, 20]},
        "t2star": {"te": [5, 10]},
        "r2star": {"te": [5, 10]},
        "monoexp": {"te": [10, 20]},
    }
    for name, text in available().items():
        print(f"{name:<9} {text}")
        model = get(name, **examples[name])
        for par in model.parameters:
            rel = " x data scale" if par.amplitude else ""
            print(
                f"    {par.name:<8} [{par.lower:g}, {par.upper:g}]{rel} {par.unit:<5} {par.description}"
            )
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    import torch

    from . import fit
    from .io import load_nifti, load_protocol
    from .io.figures import save_map_figure
    from .models import get
    from .models.registry import check_name

    check_name(args.model)  # fail fast, before reading any data
    settings: dict[str, Any] = {}
    if args.protocol:
        settings.update(load_protocol(args.protocol))
        proto_model = settings.pop("model", None)
        settings.pop("description", None)
        if proto_model and proto_model.lower() != args.model.lower():
            raise QmrkitError(
                f"the protocol is for model {proto_model!r} but {args.model!r} was asked"
            )
    for key in ("ti", "te", "flip_angles", "tr"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    data, affine = load_nifti(args.data)
    if args.b1:
        b1, _ = load_nifti(args.b1)
        settings["b1"] = b1
    model = get(args.model, **settings)
    mask = load_nifti(args.mask)[0] != 0 if args.mask else None
    dtype = torch.float64 if args.float64 else torch.float32
    common = {"mask": mask, "device": args.device, "dtype": dtype}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.solver == "lm":
            kw = {"max_iter": args.max_iter} if args.max_iter else {}
            result = fit.lm(model, data, progress=args.progress, **common, **kw)
        elif args.solver == "adam":
            regs = []
            if args.tv > 0:
                names = [p.name for p in model.parameters if not p.amplitude]
                regs.append(fit.TotalVariation(names, args.tv))
            kw = {"max_iter": args.max_iter} if args.max_iter else {}
            result = fit.adam(
                model,
                data,
                loss=args.loss,
                regularizers=regs,
                progress=args.progress,
                **common,
                **kw,
            )
        else:
            result = fit.dictionary_search(model, data, **common)
    from .errors import QmrkitWarning

    for w in caught:
        if issubclass(w.category, QmrkitWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    written = result.save(
        args.out,
        affine=affine,
        extra_sidecar={
            "Input": str(args.data),
            "Acquisition": {k: v for k, v in settings.items() if k != "b1"},
        },
    )
    if not args.no_figure:
        derived = [k for k in result.maps if k not in model.parameter_names]
        names = derived + [k for k in model.parameter_names if k in result.maps]
        written.append(
            save_map_figure(
                args.out / "maps.png",
                result.maps,
                units=result.units,
                names=names,
                title=f"{model.name} ({result.solver})",
            )
        )
    print(result.summary())
    print(f"wrote {len(written)} files to {args.out} in {time.perf_counter() - t0:.2f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qmrkit`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    from ._progress import configure_logging

    configure_logging(args.verbose)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"fit": _cmd_fit, "models": _cmd_models, "recon": _cmd_recon}
    try:
        return handlers[args.command](args)
    except QmrkitError as exc:
        # a user mistake: one clear line, no traceback from deep inside torch
        print(f"qmrkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
