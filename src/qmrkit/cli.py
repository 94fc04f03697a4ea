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

    sv = sub.add_parser(
        "serve",
        help="run the MRD streaming reconstruction server",
        description="Serve reconstructions over the MRD/ISMRMRD streaming protocol.",
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=9002, help="TCP port (default 9002)")
    sv.add_argument(
        "--store", type=Path, help="dependency store directory (shared volume in a cluster)"
    )
    sv.add_argument(
        "--max-concurrent", type=int, default=1, help="reconstructions at once (others queue)"
    )
    sv.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    sv.add_argument(
        "--grace", type=float, default=600.0, help="seconds to drain in-flight scans on SIGTERM"
    )
    sv.add_argument(
        "--read-timeout", type=float, default=120.0, help="drop a connection idle this long (s)"
    )
    sv.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for TLS")
    sv.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    sv.add_argument(
        "--tls-ca", type=Path, help="CA bundle: require client certificates signed by it"
    )

    sd = sub.add_parser("send", help="stream an ISMRMRD file to a server and save what comes back")
    sd.add_argument("scan", type=Path, help="ISMRMRD/MRD HDF5 file")
    sd.add_argument("--host", default="127.0.0.1")
    sd.add_argument("--port", type=int, default=9002)
    sd.add_argument("--config", required=True, help="pipeline name, e.g. fit:molli, store-b1, null")
    sd.add_argument(
        "--compress", type=float, help="tolerated SNR loss for raw-data compression, e.g. 0.01"
    )
    sd.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="extra pipeline parameter (repeatable), e.g. ti=[100,200]",
    )
    sd.add_argument("--retries", type=int, default=3)
    sd.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    sd.add_argument("--tls-key", type=Path)
    sd.add_argument(
        "--tls-ca", type=Path, help="CA that signed the server's certificate (enables TLS)"
    )
    sd.add_argument(
        "--out", required=True, type=Path, help="output folder (images.h5, NIfTI, log.txt)"
    )
    _add_recon_parser(sub)
    _learn_parser(sub)

    mr = sub.add_parser(
        "mrf",
        help="MR fingerprinting: ISMRMRD spiral raw data -> T1, T2, PD maps",
        description="Reconstruct an MRF scan (one spiral interleaf per TR, schedule in the "
        "header's sequenceParameters) by subspace reconstruction and dictionary matching.",
    )
    mr.add_argument("scan", type=Path, help="ISMRMRD/MRD HDF5 raw data")
    mr.add_argument(
        "--b1", type=Path, help="B1 map (fraction of nominal), NIfTI in the image's geometry"
    )
    mr.add_argument(
        "--dictionary", type=Path, help="dictionary .npz (default: simulated for the schedule)"
    )
    mr.add_argument(
        "--dictionary-step",
        type=float,
        default=0.05,
        help="relative T1/T2 grid step of the default dictionary (default 0.05 = 5 %%)",
    )
    mr.add_argument(
        "--b1-step", type=float, default=0.05, help="B1 grid step of the default dictionary"
    )
    mr.add_argument("--n-iter", type=int, default=0, help="low-rank CG refinement iterations")
    mr.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    mr.add_argument("--out", required=True, type=Path, help="output folder")
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
        a.add_argument(
            "--data",
            type=Path,
            help="dataset .npz, or a fully sampled Cartesian MRD file (.h5/.mrd, undersampled "
            "with --accel) (default: synthetic phantoms)",
        )
        a.add_argument("--val-data", type=Path, help="validation .npz or .h5/.mrd (train only)")
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
            a.add_argument(
                "--denoiser",
                choices=("residual", "coupling"),
                default="residual",
                help="ResidualCNN (default; reversible/hybrid need --spectral-norm) or "
                "CouplingCNN (exactly invertible: the cheapest reversible/hybrid steps, a weaker "
                "denoiser)",
            )
            a.add_argument(
                "--couplings", type=int, default=2, help="couplings of --denoiser coupling"
            )
            a.add_argument("--unshared", action="store_true", help="separate weights per unroll")
            a.add_argument("--lam", type=float, default=0.05, help="initial CG weight λ")
            a.add_argument("--cg-iter", type=int, default=10)
            a.add_argument("--epochs", type=int, default=10)
            a.add_argument("--lr", type=float, default=1e-3)
            a.add_argument("--loss", choices=("l1", "l2", "ssim"), default="l2")
            a.add_argument("--batch-size", type=int, default=1)
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
            a.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
        else:
            a.add_argument(
                "--checkpoint",
                type=Path,
                required=True,
                help="best.pt or last.pt, or best.safetensors or last.safetensors",
            )


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
    data, affine, header = load_nifti(args.data, with_header=True)
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
        like=header,  # keep the input's qform/sform codes
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


def _cmd_mrf(args: argparse.Namespace) -> int:
    from .io import load_nifti
    from .io.mrd import read_mrd
    from .mrf import Dictionary, log_grid, schedule_from_header
    from .pipelines import mrf_maps

    t0 = time.perf_counter()
    scan = read_mrd(args.scan)
    schedule = schedule_from_header(scan.header)
    b1 = None
    if args.b1:
        b1 = load_nifti(args.b1)[0].T  # NIfTI (x, y) -> image (y, x)
        if tuple(b1.shape) != tuple(scan.recon_size or scan.matrix_size):
            raise QmrkitError(
                f"the B1 map has shape {b1.shape[::-1]} (x, y) but the scan's image is "
                f"{tuple(scan.recon_size or scan.matrix_size)[::-1]}"
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
    written = maps.save(args.out)
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in maps.stages.items())
    print(
        f"mrf: {stages}; wrote {len(written)} files to {args.out} ({time.perf_counter() - t0:.1f} s in all)"
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import Limits, run_server, tls_context
    from .serve.store import DirectoryStore

    ctx = tls_context(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    store = DirectoryStore(args.store) if args.store else None
    run_server(
        args.host,
        args.port,
        store=store,
        max_concurrent=args.max_concurrent,
        ssl_context=ctx,
        metrics_port=args.metrics_port,
        grace_s=args.grace,
        limits=Limits(read_timeout=args.read_timeout),
    )
    return 0


def _cmd_send(args: argparse.Namespace) -> int:
    import json

    import ismrmrd

    from .pipelines import noise_statistics
    from .serve import client_tls_context, read_mrd_file, save_reply, send_scan

    header, acqs, images = read_mrd_file(args.scan)
    params = {}
    for item in args.param:
        key, _, val = item.partition("=")
        try:
            params[key] = json.loads(val)
        except json.JSONDecodeError:
            params[key] = val
    sigma = None
    if args.compress is not None:
        noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
        if not noise:
            raise QmrkitError(
                "--compress needs noise scans in the file (acquisitions flagged as noise)"
            )
        import numpy as np

        sigma = noise_statistics(np.concatenate([a.data for a in noise], axis=1))["sigma"]
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
        progress=None,
    )
    for line in reply.texts:
        print(f"server: {line}")
    written = save_reply(reply, args.out, header_xml=header)
    ratio = reply.bytes_raw / max(reply.bytes_sent, 1)
    print(
        f"sent {reply.bytes_sent:,} bytes ({ratio:.2f}x smaller than raw), received {len(reply.images)} "
        f"images in {reply.seconds:.2f} s; wrote {len(written)} files to {args.out}"
    )
    return 1 if reply.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qmrkit`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    from ._progress import configure_logging

    configure_logging(args.verbose)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {
        "fit": _cmd_fit,
        "models": _cmd_models,
        "recon": _cmd_recon,
        "serve": _cmd_serve,
        "send": _cmd_send,
        "mrf": _cmd_mrf,
        "learn": _cmd_learn,
    }
    try:
        return handlers[args.command](args)
    except QmrkitError as exc:
        # a user mistake: one clear line, no traceback from deep inside torch
        print(f"qmrkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
