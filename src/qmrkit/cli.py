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
    _learn_parser(sub)
    return p


def _learn_parser(sub) -> None:
    """``qmrkit learn train|eval``: unrolled networks with memory-efficient training."""
    lp = sub.add_parser(
        "learn",
        help="train or evaluate unrolled reconstruction networks (qmrkit.learn)",
        description="Train or evaluate MoDL-style unrolled networks on Cartesian multi-coil data "
        "(an .npz file with kspace, maps, masks, targets, or synthetic phantoms).",
    )
    lsub = lp.add_subparsers(dest="learn_command", metavar="ACTION", required=True)
    for name in ("train", "eval"):
        a = lsub.add_parser(name, help=f"{name} a network")
        a.add_argument("--data", type=Path, help="dataset .npz (default: synthetic phantoms)")
        a.add_argument("--val-data", type=Path, help="validation .npz (train only)")
        a.add_argument("--n", type=int, default=32, help="synthetic samples (default 32)")
        a.add_argument("--n-val", type=int, default=8, help="synthetic validation samples")
        a.add_argument("--kind", choices=("2d", "3d", "2d+t"), default="2d")
        a.add_argument("--shape", type=int, nargs="+", default=[32, 32], help="image shape")
        a.add_argument("--coils", type=int, default=4)
        a.add_argument("--accel", type=float, default=4.0, help="undersampling factor")
        a.add_argument("--noise", type=float, default=0.02, help="relative k-space noise")
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
        a.add_argument(
            "--out",
            type=Path,
            required=name == "train",
            help="output folder (checkpoints, metrics.json)",
        )
        if name == "train":
            a.add_argument("--unrolls", type=int, default=5)
            a.add_argument(
                "--memory",
                choices=("standard", "checkpoint", "reversible", "hybrid"),
                default="checkpoint",
            )
            a.add_argument("--dc", choices=("cg", "gradient"), default="cg")
            a.add_argument("--channels", type=int, default=32)
            a.add_argument("--layers", type=int, default=5)
            a.add_argument("--conv", choices=("full", "separable"), default="full")
            a.add_argument("--spectral-norm", action="store_true")
            a.add_argument("--unshared", action="store_true", help="separate weights per unroll")
            a.add_argument("--lam", type=float, default=0.05, help="initial CG weight λ")
            a.add_argument("--cg-iter", type=int, default=10)
            a.add_argument("--epochs", type=int, default=10)
            a.add_argument("--lr", type=float, default=1e-3)
            a.add_argument("--loss", choices=("l1", "l2", "ssim"), default="l2")
            a.add_argument("--batch-size", type=int, default=1)
            a.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
            a.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
        else:
            a.add_argument("--checkpoint", type=Path, required=True, help="best.pt or last.pt")


def _cmd_learn(args: argparse.Namespace) -> int:
    from .learn._cli import run

    return run(args)


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
    handlers = {"fit": _cmd_fit, "models": _cmd_models, "learn": _cmd_learn}
    try:
        return handlers[args.command](args)
    except QmrkitError as exc:
        # a user mistake: one clear line, no traceback from deep inside torch
        print(f"qmrkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
