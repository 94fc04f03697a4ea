"""Prepare the wheels that the lent GPU machine's interpreter lacks (``make gpu-wheels``).

The GPU machine has no network and its own ``python3`` (3.12, x86-64 Linux) with a CUDA PyTorch,
numpy, scipy, matplotlib, h5py, pyyaml, tqdm, prometheus-client, safetensors, pytest and
pytest-xdist already installed (the device tool's KINDS.md lists them). What qmrkit's core, its
CUDA tests and benchmarks/gpu_check.py need beyond that is downloaded here for that interpreter
(``pip download --only-binary=:all: --no-deps`` for cp312 on manylinux x86-64), never torch or the
nvidia-* CUDA libraries the machine already has, into ``.gpu-wheels/`` (git-ignored), which travels
with the run (the device tool's ``carry``; at most 64 MiB together with the working tree).

cuFINUFFT's wheel holds an 80 MB library; wheels over 1 MB are therefore re-packed with LZMA
compression (the same files, so the same RECORD hashes; pip reads LZMA zip members), which halves
them. The script then installs every wheel into a temporary folder to prove they unpack, and
prints the total size, failing if it is over ``--limit-mib``.

Usage: python benchmarks/gpu_wheels.py [--dest .gpu-wheels] [--python-version 3.12]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name==version: pinned so the carried set is reproducible. cufinufft 2.4.1 is the newest whose
# wheel stays small (53 MB, 25 MB re-packed; 2.5 ships a 175 MB library). It links the CUDA 12
# runtime (libcudart.so.12, hence nvidia-cuda-runtime-cu12) and libcufft.so.11 (see
# gpu_check.cuda_library_path for how that is found).
WHEELS = [
    "nibabel==5.4.2",  # core: NIfTI
    "ismrmrd==1.15.0",  # core: MRD raw data
    "xsdata==26.10",  # ismrmrd's XML header
    "finufft==2.5.1",  # CPU reference of the NUFFT tests
    "cufinufft==2.4.1",  # the GPU reference of the NUFFT benchmark
    "nvidia-cuda-runtime-cu12==12.9.79",  # libcudart.so.12 for cufinufft
    "torchkbnufft==1.5.2",  # test reference
    "emcee==3.1.6",  # test reference (MCMC)
]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def repack_lzma(path: Path) -> None:
    """Rewrite a wheel with LZMA-compressed members (contents, names and order unchanged)."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as zo:
        for info in zi.infolist():
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr = info.external_attr  # keeps the executable bit of .so files
            out.compress_type = zipfile.ZIP_LZMA
            zo.writestr(out, zi.read(info))
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=ROOT / ".gpu-wheels")
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--limit-mib", type=float, default=48.0, help="leave room for the tree")
    ap.add_argument("--no-repack", action="store_true")
    a = ap.parse_args()
    a.dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps"]
    cmd += ["--only-binary=:all:", "--python-version", a.python_version, "--implementation", "cp"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += ["--platform", "any", "-d", str(a.dest), *WHEELS]
    subprocess.run(cmd, check=True)
    wanted = {w.split("==")[0].replace("-", "_").lower() for w in WHEELS}
    for f in sorted(a.dest.glob("*.whl")):
        name = f.name.split("-")[0].lower()
        if name not in wanted:  # an older download of something no longer on the list
            print(f"removing {f.name} (not in the list)")
            f.unlink()
            continue
        if not a.no_repack and f.stat().st_size > 1 << 20:
            with zipfile.ZipFile(f) as z:
                packed = all(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist())
            if not packed:
                before = f.stat().st_size
                repack_lzma(f)
                print(
                    f"re-packed {f.name}: {before / 2**20:.1f} → {f.stat().st_size / 2**20:.1f} MiB"
                )
    with tempfile.TemporaryDirectory() as tmp:
        files = [str(f) for f in sorted(a.dest.glob("*.whl"))]
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
            + ["--no-compile", "--disable-pip-version-check", "--target", tmp, *files],
            check=True,
        )
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(f.stat().st_size for f in a.dest.glob("*.whl"))
    for f in sorted(a.dest.glob("*.whl")):
        print(f"{f.stat().st_size / 2**20:7.2f} MiB  {f.name}")
    print(f"{total / 2**20:7.2f} MiB  in {a.dest} (limit {a.limit_mib} MiB); all install cleanly")
    if total > a.limit_mib * 2**20:
        print("over the limit: the working tree and the wheels must stay under 64 MiB together")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
