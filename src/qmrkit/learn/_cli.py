"""Implementation of ``qmrkit learn train|eval`` (the parser lives in :mod:`qmrkit.cli`)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..errors import ParameterError
from .data import ArrayDataset, MrdDataset, SyntheticDataset
from .denoisers import CouplingCNN, ResidualCNN
from .train import baselines, evaluate, load_model, train
from .unrolled import UnrolledNet


def _load(path, args: argparse.Namespace, seed: int):
    """``.npz`` arrays, or fully sampled ISMRMRD/MRD files (``.h5``, ``.mrd``, ``.hdf5``)."""
    if str(path).lower().endswith((".h5", ".mrd", ".hdf5")):
        return MrdDataset(path, acceleration=getattr(args, "accel", 4.0), seed=seed)
    return ArrayDataset.from_npz(path)


def _datasets(args: argparse.Namespace, val: bool):
    if args.data is not None:
        ds = _load(args.data, args, 0)
        vds = _load(args.val_data, args, 1) if val and getattr(args, "val_data", None) else None
        return ds, vds
    shape = tuple(args.shape)
    want = 2 if args.kind == "2d" else 3
    if len(shape) != want:
        raise ParameterError(f"--shape needs {want} numbers for --kind {args.kind}, got {shape}")
    common = dict(
        shape=shape, n_coils=args.coils, acceleration=args.accel, noise=args.noise, kind=args.kind
    )
    if val:
        return (
            SyntheticDataset(args.n, seed=args.seed, **common),
            SyntheticDataset(args.n_val, seed=args.seed + 1, **common),
        )
    # evaluation on held-out synthetic samples (a seed the training command never uses)
    return SyntheticDataset(args.n_val, seed=args.seed + 1, **common), None


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.learn_command == "train":
        ds, vds = _datasets(args, val=True)
        sample = ds[0]
        ndim = sample["target"].ndim
        torch.manual_seed(args.seed)
        conv = args.conv if ndim == 3 else "full"
        if args.denoiser == "coupling":
            den: torch.nn.Module = CouplingCNN(
                ndim,
                channels=args.channels,
                layers=args.layers,
                couplings=args.couplings,
                conv=conv,
            )
        else:
            den = ResidualCNN(
                ndim,
                channels=args.channels,
                layers=args.layers,
                conv=conv,
                spectral_norm=args.spectral_norm,
            )
        model = UnrolledNet(
            args.unrolls,
            den,
            data_consistency=args.dc,
            shared_weights=not args.unshared,
            memory=args.memory,
            lam=args.lam,
            cg_max_iter=args.cg_iter,
            cg_tol=1e-5,
        )
        res = train(
            model,
            ds,
            val_dataset=vds,
            epochs=args.epochs,
            lr=args.lr,
            loss=args.loss,
            batch_size=args.batch_size,
            checkpoint_dir=args.out,
            resume=args.resume,
            checkpoint_format=args.checkpoint_format,
            seed=args.seed,
            device=args.device,
            progress=args.progress,
        )
        summary = {
            "history": res.history,
            "best_epoch": res.best_epoch,
            "best_val_nrmse": res.best_val_nrmse,
            "steps": res.steps,
            "elapsed_s": res.elapsed_s,
        }
        if vds is not None:
            summary["baselines"] = baselines(vds, device=args.device)
        (args.out / "metrics.json").write_text(json.dumps(summary, indent=2))
        last = res.history[-1] if res.history else {}
        print(
            f"trained {args.unrolls} unrolls ({args.memory}) for {res.steps} steps in "
            f"{res.elapsed_s:.1f} s; last epoch: "
            + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
        )
        if "baselines" in summary:
            b = summary["baselines"]
            print(
                f"baselines: zero-filled NRMSE {b['zero_filled']['nrmse']:.4g}, "
                f"CG-SENSE NRMSE {b['cg_sense']['nrmse']:.4g}"
            )
        print(f"checkpoints and metrics.json in {args.out}")
        return 0
    model = load_model(args.checkpoint, device=args.device)
    ds, _ = _datasets(args, val=False)
    metrics = {
        "model": evaluate(model, ds, device=args.device),
        "baselines": baselines(ds, device=args.device),
    }
    text = json.dumps(metrics, indent=2)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eval.json").write_text(text)
    print(text)
    print(f"evaluated {len(ds)} samples in {time.perf_counter() - t0:.1f} s")
    return 0
