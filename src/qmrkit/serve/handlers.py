"""Reconstruction pipelines selectable by config name, registered in one place.

A handler receives the collected :class:`~qmrkit.serve.server.Session` and returns the images and
text lines to send back. Handlers only call :mod:`qmrkit.pipelines` functions (and the dependency
store); they never reach into solver internals.

Config names: ``null``, ``fit:<model>`` (image series → maps), ``mrf`` (spiral MR fingerprinting
raw data → T1/T2/PD maps, B1-corrected with a stored B1 map), ``sense``/``tv``/``gridding`` (raw
data → images through :func:`qmrkit.recon.reconstruct`), ``store-b1`` (a B1 map image →
dependency store), ``store-noise`` (noise acquisitions → noise statistics in the store).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ParameterError, ProtocolError, UnknownNameError
from .mrd_images import array_to_image, image_to_array

if TYPE_CHECKING:
    from .server import Session

Handler = Callable[["Session", "str | None"], list[Any]]
HANDLERS: dict[str, Handler] = {}


def register(name: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        HANDLERS[name] = fn
        return fn

    return deco


def resolve(config: str) -> tuple[Handler, str | None]:
    """``"fit:molli"`` → (the fit handler, ``"molli"``); unknown names list the known ones."""
    name, _, arg = config.strip().partition(":")
    name = name.strip().lower()
    if name.endswith(".xml"):  # Gadgetron-style config file names
        name = name[:-4]
    if name not in HANDLERS:
        raise UnknownNameError(
            f"unknown config {config!r}; this server knows {sorted(HANDLERS)} (fit takes a model: fit:molli)"
        )
    return HANDLERS[name], (arg.strip() or None)


@register("null")
def _null(session: Session, arg: str | None) -> list[Any]:
    return [
        f"null pipeline: received {len(session.acquisitions)} acquisitions, {len(session.images)} images, "
        f"{len(session.waveforms)} waveforms"
    ]


def _sequence_settings(header: Any) -> dict[str, list[float]]:
    sp = getattr(header, "sequenceParameters", None)
    out: dict[str, list[float]] = {}
    if sp is None:
        return out
    for field, key in (("TI", "ti"), ("TE", "te"), ("TR", "tr"), ("flipAngle_deg", "flip_angles")):
        vals = getattr(sp, field, None)
        if vals:
            out[key] = [float(v) for v in vals]
    return out


def series_from_images(images: list[Any]) -> np.ndarray:
    """Stack MRD images (one per measurement, ordered by image_index) into (*spatial, n)."""
    if not images:
        raise ProtocolError("this pipeline needs images, but the client sent none")
    ordered = sorted(images, key=lambda im: (int(im.image_index), int(im.contrast)))
    arrays = [image_to_array(im) for im in ordered]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ProtocolError(f"the images of a series must have one size, got {sorted(shapes)}")
    return np.stack(arrays, axis=-1)


@register("fit")
def _fit(session: Session, arg: str | None) -> list[Any]:
    from ..models.registry import _MODELS, check_name
    from ..pipelines import fit_maps

    if not arg:
        raise ParameterError("config 'fit' needs a model, e.g. fit:molli")
    key = check_name(arg)
    series = series_from_images(session.images)
    settings = _sequence_settings(session.header)
    settings.update(
        {
            k: v
            for k, v in session.parameters.items()
            if k in ("ti", "te", "tr", "flip_angles", "kind")
        }
    )
    cls = _MODELS[key][0]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in settings.items() if k in accepted}
    if "tr" in kwargs and isinstance(kwargs["tr"], list):
        kwargs["tr"] = kwargs["tr"][0]
    if key == "vfa" and session.store is not None and session.header is not None:
        b1 = _find_dependency(session, "b1")
        if b1 is not None and b1.arrays["b1"].shape == series.shape[:-1]:
            kwargs["b1"] = b1.arrays["b1"]
            session.log.append("using the stored B1 map")
    t0 = time.perf_counter()
    result = fit_maps(series, arg, kwargs)
    session.stage("fit", time.perf_counter() - t0)
    like = session.images[0]
    out: list[Any] = []
    for i, (name, m) in enumerate(result.maps.items(), start=1):
        unit = result.units.get(name, "")
        stem = result.map_names.get(name, name)
        meta = {
            "DataRole": "Quantitative",
            "SeriesDescription": f"qmrkit_{stem}",
            "ImageComment": f"{name} [{unit}]" if unit else name,
            "Units": unit,
            "ImageProcessingHistory": "qmrkit",
        }
        out.append(array_to_image(m.cpu().numpy(), series_index=i, meta=meta, like=like))
    out.append(
        f"fit:{arg}: {result.n_voxels} voxels in {result.elapsed_s:.2f} s, "
        f"{100 * result.fraction_converged:.1f}% converged"
    )
    return out


def _find_dependency(session: Session, kind: str) -> Any:
    from .store import dependencies_in_header, key_from_header

    key = key_from_header(session.header)
    for dep_type, mid in dependencies_in_header(session.header):
        if dep_type.lower().replace("_", "").startswith(kind.replace("_", "")):
            dep = session.store.get(key, kind, mid)
            if dep is not None:
                return dep
    return session.store.get(key, kind)


@register("store-b1")
def _store_b1(session: Session, arg: str | None) -> list[Any]:
    from .store import key_from_header, measurement_id

    if session.store is None:
        raise ParameterError("this server has no dependency store (start it with --store DIR)")
    series = series_from_images(session.images)
    b1 = series[..., 0].astype(np.float32)
    units = session.parameters.get("units", "fraction")
    if units == "percent":
        b1 = b1 / 100.0
    session.store.put(
        key_from_header(session.header),
        "b1",
        measurement_id(session.header),
        {"b1": b1},
        meta={"shape": list(b1.shape)},
    )
    return [f"store-b1: stored a B1 map of shape {b1.shape}"]


@register("store-noise")
def _store_noise(session: Session, arg: str | None) -> list[Any]:
    import ismrmrd

    from ..pipelines import noise_statistics
    from .store import key_from_header, measurement_id

    if session.store is None:
        raise ParameterError("this server has no dependency store (start it with --store DIR)")
    noise = [a for a in session.acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    if not noise:
        raise ProtocolError("store-noise needs acquisitions flagged ACQ_IS_NOISE_MEASUREMENT")
    stats = noise_statistics(np.concatenate([np.asarray(a.data) for a in noise], axis=1))
    session.store.put(
        key_from_header(session.header), "noise", measurement_id(session.header), stats
    )
    return [f"store-noise: stored noise statistics of {stats['sigma'].size} channels"]


def parse_parameters(text: str) -> dict[str, Any]:
    """The optional JSON text after the header: ``{"parameters": {"config": ..., ...}}``."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return {}
    params = obj.get("parameters", obj) if isinstance(obj, dict) else {}
    return params if isinstance(params, dict) else {}


_DICTIONARY_CACHE: dict[tuple, Any] = {}


@register("mrf")
def _mrf(session: Session, arg: str | None) -> list[Any]:
    """MRF raw data (2D or 3D) → T1, T2, PD, B1, match-score maps, B1-corrected with a stored B1
    map of the scan's image shape (NIfTI order, as stored). 2D maps go back as one image per map;
    3D maps as one image per partition (image_index = partition, in slice order), like the other
    3D reconstructions."""
    from ..mrf import Dictionary, log_grid, schedule_from_header
    from ..pipelines import b1_grid, mrf_image_size, mrf_maps

    scan = _scan_from_session(session)
    im_size = mrf_image_size(scan)
    schedule = schedule_from_header(session.header)
    b1_map = None
    if session.store is not None:
        dep = _find_dependency(session, "b1")
        if dep is not None:
            b = dep.arrays["b1"]  # stored in image (x, y[, z]) order: what mrf_maps takes
            if b.shape == im_size[::-1]:
                b1_map = b
                session.log.append("mrf: using the stored B1 map")
            else:
                session.log.append(
                    f"mrf: not using the stored B1 map: shape {b.shape}, the scan's image is "
                    f"{im_size[::-1]} (x, y[, z])"
                )
    step = float(session.parameters.get("dictionary_step", 0.05))
    b1_step = float(session.parameters.get("b1_step", 0.05))
    b1_values: tuple = (1.0,) if b1_map is None else tuple(b1_grid(b1_map, b1_step))
    key = (
        schedule.flip_angles.tobytes(),
        schedule.tr.tobytes(),
        schedule.te.tobytes(),
        schedule.ti,
        step,
        b1_values,
    )
    t0 = time.perf_counter()
    dictionary = _DICTIONARY_CACHE.get(key)
    if dictionary is None:  # the dictionary of a protocol is built once per server process
        dictionary = Dictionary.build(
            schedule,
            t1=log_grid(10, 4000, step),
            t2=log_grid(1, 500, step),
            b1=b1_values,
            keep_atoms=False,
        )
        _DICTIONARY_CACHE.clear()
        _DICTIONARY_CACHE[key] = dictionary
        session.stage("dictionary", time.perf_counter() - t0)
    maps = mrf_maps(scan, dictionary=dictionary, b1_map=b1_map, schedule=schedule)
    for stage, seconds in maps.stages.items():
        if stage != "total":
            session.stage(stage, seconds)
    units = {"T1": "ms", "T2": "ms", "PD": "a.u.", "B1": "fraction", "score": ""}
    stems = {"T1": "T1map", "T2": "T2map", "PD": "M0map", "B1": "B1map", "score": "matchscore"}
    out: list[Any] = []
    for i, (name, m) in enumerate(maps.maps().items(), start=1):
        meta = {
            "DataRole": "Quantitative",
            "SeriesDescription": f"qmrkit_{stems[name]}",
            "ImageComment": f"{name} [{units[name]}]" if units[name] else name,
            "Units": units[name],
            "ImageProcessingHistory": "qmrkit mrf",
        }
        a = m.cpu().numpy()  # NIfTI order (x, y[, z])
        # 3D: one (x, y) image per partition, in slice order
        planes = [a] if a.ndim == 2 else [a[:, :, p] for p in range(a.shape[2])]
        out.extend(
            array_to_image(plane, series_index=i, image_index=p, meta=meta)
            for p, plane in enumerate(planes)
        )
    out.append(
        f"mrf: {'x'.join(str(n) for n in maps.t1.shape)} maps; "
        + ", ".join(f"{k} {v:.2f} s" for k, v in maps.stages.items())
    )
    return out


def _scan_from_session(session: Session) -> Any:
    """The session's header and acquisitions as a RawScan, through the same assembly as files."""
    from ..io.mrd import scan_from_acquisitions

    if not session.acquisitions:
        raise ProtocolError("this pipeline needs acquisitions, but the client sent none")
    return scan_from_acquisitions(session.header_xml, session.acquisitions, source="stream")


def _image_recon(session: Session, method: str) -> list[Any]:
    from ..recon import reconstruct

    t0 = time.perf_counter()
    scan = _scan_from_session(session)
    result, image = reconstruct(scan, method)
    session.stage(method, time.perf_counter() - t0)
    img = image.detach().cpu().numpy()
    mag = np.abs(img)
    arr = mag.T if mag.ndim in (2, 3) else mag  # ours (…, y, x) → MRD (x, y[, z]) order
    meta = {
        "DataRole": "Image",
        "SeriesDescription": f"qmrkit_{method}",
        "ImageProcessingHistory": f"qmrkit {method}",
    }
    return [
        array_to_image(arr, series_index=1, meta=meta),
        f"{method}: image {tuple(img.shape)} in {time.perf_counter() - t0:.2f} s",
    ]


@register("sense")
def _sense(session: Session, arg: str | None) -> list[Any]:
    return _image_recon(session, "sense")


@register("tv")
def _tv(session: Session, arg: str | None) -> list[Any]:
    return _image_recon(session, "tv")


@register("gridding")
def _gridding(session: Session, arg: str | None) -> list[Any]:
    return _image_recon(session, "gridding")
