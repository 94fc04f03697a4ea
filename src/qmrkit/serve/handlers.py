"""Reconstruction pipelines selectable by config name, registered in one place.

A handler receives the collected :class:`~qmrkit.serve.session.Session` and returns the images and
text lines to send back. Handlers only call :mod:`qmrkit.pipelines` functions (and the dependency
store); they never reach into solver internals.

Config names: ``null``, ``fit:<model>`` (image series → maps), ``mrf`` (spiral MR fingerprinting
raw data → T1/T2/PD maps, B1-corrected with a stored B1 map), ``sense``/``tv``/``gridding`` (raw
data → images through :func:`qmrkit.recon.reconstruct`: a magnitude and a phase series),
``store-b1`` (a B1 map image → dependency store), ``store-noise`` (noise acquisitions → noise
statistics in the store; later scans of the same subject/device/session without their own noise
acquisitions are prewhitened with it), ``dependency-query`` (config + header only: which
calibrations of this subject/device/session are stored, answered as a 1019 message).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ParameterError, ProtocolError, ShapeError, UnknownNameError
from .mrd_images import array_to_image, image_geometry, image_to_array, volume_to_image
from .session import Session, shorten

Handler = Callable[[Session, "str | None"], list[Any]]
HANDLERS: dict[str, Handler] = {}


def register(name: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        HANDLERS[name] = fn
        return fn

    return deco


def _split(config: str) -> tuple[str, str]:
    name, _, arg = str(config).strip().partition(":")
    name = name.strip().lower()
    if name.endswith(".xml"):  # Gadgetron-style config file names
        name = name[:-4]
    return name, arg.strip()


def resolve(config: str) -> tuple[Handler, str | None]:
    """``"fit:molli"`` → (the fit handler, ``"molli"``); unknown names list the known ones.

    Checked when a session starts, before its data is read: an unknown pipeline or model is
    refused at once, and the client's text is quoted only in part (:func:`shorten`).
    """
    name, arg = _split(config)
    if name not in HANDLERS:
        raise UnknownNameError(
            f"unknown config {shorten(config)!r}; this server knows {sorted(HANDLERS)} "
            "(fit takes a model: fit:molli)"
        )
    if name == "fit" and arg:
        from ..models.registry import check_name

        try:
            check_name(arg)
        except UnknownNameError as exc:
            raise UnknownNameError(
                f"config fit:{shorten(arg)}: {str(exc).split('; ', 1)[-1]}"
            ) from None
    return HANDLERS[name], (arg or None)


#: pipelines that take raw acquisitions and assemble them with ``io.mrd.ScanAssembler``: the
#: server feeds each acquisition to the assembler as it arrives (k-space is filled while the
#: client sends), so a session holds k-space rather than a list of acquisitions
STREAMING = frozenset({"sense", "tv", "gridding", "mrf"})


def streams(config: str) -> bool:
    """Whether ``config``'s pipeline assembles acquisitions as they arrive."""
    return handler_name(config) in STREAMING


def handler_name(config: str) -> str:
    """The registered pipeline name of ``config`` (``"fit"`` for ``"fit:molli"``), or
    ``"unknown"``: the only values a metrics label takes, so a client cannot create series."""
    name, _ = _split(config)
    return name if name in HANDLERS else "unknown"


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
        elif b1 is not None:
            session.log.append(
                f"fit:{arg}: stored B1 map not used: its shape {b1.arrays['b1'].shape} differs "
                f"from the series' {series.shape[:-1]}"
            )
    t0 = time.perf_counter()
    # background voxels NaN, as `qmrkit fit`: the one object_mask rule; mask="none" fits all
    mask = str(session.parameters.get("mask", "auto"))
    result = fit_maps(series, arg, kwargs, mask=mask)
    session.stage("fit", time.perf_counter() - t0)
    geometry = image_geometry(session.header, session.images[0])  # maps lie where the series lies
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
        out.append(array_to_image(m.cpu().numpy(), series_index=i, meta=meta, geometry=geometry))
    info = result.settings.get("mask")
    masked = (
        f" (mask auto: threshold {info['Threshold']:.4g})"
        if info and info.get("BackgroundFound")
        else " (mask auto: no background found)"
        if info
        else ""
    )
    out.append(
        f"fit:{arg}: {result.n_voxels} voxels{masked} in {result.elapsed_s:.2f} s, "
        f"{100 * result.fraction_converged:.1f}% converged"
    )
    return out


_LABELS = {"b1": "B1 map", "noise": "noise scan"}


def _find_dependency(session: Session, kind: str) -> Any:
    """The stored ``kind`` dependency for this session's scan, or None; when there is none the
    reason (no ids in the header, nothing stored) goes to the reply text."""
    from .store import find_dependency

    found = find_dependency(session.store, session.header, kind, _LABELS.get(kind, kind))
    if found.dependency is None:
        session.log.append(found.note)
    return found.dependency


def _calibration_key(session: Session, config: str) -> Any:
    """The store key of a calibration scan; refused without a store or without complete ids."""
    from .store import key_from_header

    if session.store is None:
        raise ParameterError("this server has no dependency store (start it with --store DIR)")
    key = key_from_header(session.header)
    if not key.complete:
        raise ParameterError(
            f"{config} refused: the MRD header lacks {', '.join(key.missing)}; a calibration is "
            "stored for one subject, device and session, and without these ids it could be "
            "applied to another subject's scan"
        )
    return key


# a B1 map (fraction of nominal) outside this open range is a mistake (percent sent as fraction,
# a flip-angle map, a phase image), not a measurement
B1_RANGE = (0.2, 3.0)


def check_b1_map(b1: np.ndarray, header: Any) -> None:
    """Refuse a B1 map of the wrong shape or with implausible values.

    Parameters
    ----------
    b1 : array (x, y[, z])
        In NIfTI order, fraction of nominal. Voxels equal to 0 are background (not measured) and
        are not checked; every other voxel must be finite and inside :data:`B1_RANGE`.
    header : ismrmrdHeader
        Its reconSpace matrix is the expected shape ``(x, y)`` (``(x, y, z)`` when z > 1).

    Raises
    ------
    ShapeError, ParameterError
    """
    ms = header.encoding[0].reconSpace.matrixSize
    expected = (int(ms.x), int(ms.y)) + ((int(ms.z),) if int(ms.z) > 1 else ())
    if b1.shape != expected:
        hint = ""
        if b1.shape == expected[::-1]:
            hint = " (it looks like (y, x) order; maps are sent in NIfTI order (x, y[, z]))"
        raise ShapeError(
            f"store-b1 refused: the B1 map has shape {b1.shape} but the header's reconSpace matrix "
            f"is {expected} (x, y[, z]){hint}"
        )
    inside = b1 != 0
    if not inside.any():
        raise ParameterError("store-b1 refused: the B1 map is zero everywhere")
    vals = b1[inside]
    bad = ~np.isfinite(vals) | (vals <= B1_RANGE[0]) | (vals >= B1_RANGE[1])
    if bad.any():
        finite = vals[np.isfinite(vals)]
        rng = f"{finite.min():.3g}..{finite.max():.3g}" if finite.size else "none finite"
        raise ParameterError(
            f"store-b1 refused: {int(bad.sum())} of {vals.size} non-zero voxels are non-finite or "
            f"outside {B1_RANGE} (fraction of nominal; zeros are background and not checked); "
            f"values found: {rng}, {int((~np.isfinite(vals)).sum())} non-finite. Percent maps "
            'need the parameter {"units": "percent"}'
        )


@register("store-b1")
def _store_b1(session: Session, arg: str | None) -> list[Any]:
    from .store import measurement_id

    key = _calibration_key(session, "store-b1")
    series = series_from_images(session.images)
    b1 = series[..., 0].astype(np.float32)
    units = session.parameters.get("units", "fraction")
    if units == "percent":
        b1 = b1 / 100.0
    check_b1_map(b1, session.header)
    session.store.put(
        key, "b1", measurement_id(session.header), {"b1": b1}, meta={"shape": list(b1.shape)}
    )
    return [f"store-b1: stored a B1 map of shape {b1.shape}"]


@register("store-noise")
def _store_noise(session: Session, arg: str | None) -> list[Any]:
    import ismrmrd

    from ..pipelines import noise_statistics
    from .store import measurement_id

    key = _calibration_key(session, "store-noise")
    noise = [a for a in session.acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    if not noise:
        raise ProtocolError("store-noise needs acquisitions flagged ACQ_IS_NOISE_MEASUREMENT")
    stats = noise_statistics(np.concatenate([np.asarray(a.data) for a in noise], axis=1))
    mid = measurement_id(session.header)
    session.store.put(key, "noise", mid, stats)
    return [
        f"store-noise: stored noise statistics of {stats['sigma'].size} channels"
        + (f" as {mid}" if mid else "")
    ]


@register("dependency-query")
def _dependency_query(session: Session, arg: str | None) -> list[Any]:
    """Answer "which calibrations of this subject/device/session are stored?" with one
    DEPENDENCY_QUERY (1019) message, as Gadgetron does, so a scanner can skip sending a noise scan
    the server already has. Needs only the config and the MRD header."""
    from .protocol import DependencyAnswer
    from .store import dependency_answer

    if session.header is None:
        raise ProtocolError("dependency-query needs the MRD header (message 3) before CLOSE")
    answer = dependency_answer(session.store, session.header)
    found, missing = answer["FoundDependencies"], answer["MissingDependencies"]
    line = (
        f"dependency-query: {len(answer['NoiseDependencies'])} noise and "
        f"{len(answer['B1Dependencies'])} B1 calibrations stored for this subject/device/session"
        + (
            f"; named in the header: {len(found)} found, {len(missing)} missing"
            if found or missing
            else ""
        )
    )
    if answer["status"][0] != "success":
        line += f" ({answer['status'][1]})"
    return [DependencyAnswer(answer), line]


def parse_parameters(text: str) -> dict[str, Any]:
    """The optional JSON text after the header: ``{"parameters": {"config": ..., ...}}``."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return {}
    except RecursionError:  # json raises it for deeply nested input
        raise ProtocolError("the JSON parameters are nested too deeply") from None
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
    planes_at = _mrf_plane_geometry(session, scan)
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
            array_to_image(plane, series_index=i, image_index=p, meta=meta, geometry=planes_at(p))
            for p, plane in enumerate(planes)
        )
    out.append(
        f"mrf: {'x'.join(str(n) for n in maps.t1.shape)} maps; "
        + ", ".join(f"{k} {v:.2f} s" for k, v in maps.stages.items())
    )
    return out


def _mrf_plane_geometry(session: Session, scan: Any) -> Callable[[int], Any]:
    """Partition index → the geometry of that (x, y) map plane: where ``scan.affine`` (the
    affine ``qmrkit mrf`` writes its NIfTI and DICOM maps with) puts it. Position = the world
    point of voxel (x//2, y//2, p) in LPS, field of view = in-plane extent and the voxel depth,
    directions from the scan; table position, measurement uid and counters from the readout
    nearest the k-space centre."""
    import dataclasses

    from ..io.geometry import ScanGeometry

    aff = scan.affine  # RAS, NIfTI order (x, y, z)
    size = scan.image_size[::-1] + ((1,) if scan.ndim == 2 else ())
    voxel = np.linalg.norm(aff[:3, :3], axis=0)
    g = scan.geometry or ScanGeometry()
    sources = _representative_acquisitions(session, scan)
    base = image_geometry(session.header, next(iter(sources.values()), None))
    lps = np.diag([-1.0, -1.0, 1.0])

    def at(p: int) -> Any:
        pos = lps @ (aff @ np.array([size[0] // 2, size[1] // 2, p, 1.0]))[:3]
        return dataclasses.replace(
            base,
            field_of_view=(
                float(voxel[0] * size[0]),
                float(voxel[1] * size[1]),
                float(voxel[2]),
            ),
            position=tuple(float(v) for v in pos),
            read_dir=tuple(g.read_dir),
            phase_dir=tuple(g.phase_dir),
            slice_dir=tuple(g.slice_dir),
        )

    return at


def _scan_from_session(session: Session) -> Any:
    """The session's header and acquisitions as a RawScan, through the same assembly as files.

    A scan without noise acquisitions gets the stored noise covariance of its subject/device/
    session (:func:`_attach_stored_noise`); ``scan.meta["noise_source"]`` then says which noise
    prewhitening will use, or ``scan.meta["noise_note"]`` why there is none
    (:func:`prewhitening_note` turns them into the line for the reply).
    """
    from ..io.mrd import scan_from_acquisitions

    if session.assembler is not None:  # streamed: k-space was filled as acquisitions arrived
        scan = session.assembler.finish()
    elif not session.acquisitions:
        raise ProtocolError("this pipeline needs acquisitions, but the client sent none")
    else:
        scan = scan_from_acquisitions(session.header_xml, session.acquisitions, source="stream")
    _attach_stored_noise(session, scan)
    return scan


def _attach_stored_noise(session: Session, scan: Any) -> None:
    """Set ``scan.noise_covariance`` from the store when the stream had no noise acquisitions.

    A stored noise scan with a different channel count than the scan (another coil) is skipped,
    not an error: the scan is still reconstructed, unwhitened, and the reply says why (as
    Gadgetron's noise adjustment does when the noise dependency does not match).
    """
    import torch

    n_c = scan.n_coils
    if scan.noise is not None:
        scan.meta["noise_source"] = f"the scan's own noise ({n_c} channels)"
        return
    if session.store is None:
        scan.meta["noise_note"] = "no noise acquisitions in the stream and no calibration store"
        return
    from .store import find_dependency

    found = find_dependency(session.store, session.header, "noise", "noise scan")
    dep = found.dependency
    if dep is None:
        scan.meta["noise_note"] = f"no noise acquisitions in the stream; {found.note}"
        return
    cov = np.asarray(dep.arrays.get("covariance"))
    name = dep.measurement_id or "(no id)"
    if cov.shape != (n_c, n_c):
        scan.meta["noise_note"] = (
            f"stored noise {name} has {cov.shape[0] if cov.ndim else 0} channels but the scan has "
            f"{n_c}; skipped"
        )
        return
    scan.noise_covariance = torch.from_numpy(cov.astype(np.complex64))
    scan.meta["noise_source"] = f"stored noise {name} ({n_c} channels)"


def prewhitening_note(scan: Any, applied: bool) -> str:
    """One line for the reply: what the scan was prewhitened with, or why not."""
    if applied and scan.meta.get("noise_source"):
        return f"prewhitened with {scan.meta['noise_source']}"
    return f"not prewhitened: {scan.meta.get('noise_note', 'no noise scan')}"


def _representative_acquisitions(session: Session, scan: Any) -> dict[tuple, Any]:
    """Per batch entry of the scan (its ``batch_dims`` counters), the imaging readout nearest the
    k-space centre: the one whose position and directions the image takes (as FIRE and
    Gadgetron take the centre line's)."""
    import ismrmrd

    if session.assembler is not None:  # it kept the nearest readout's header per batch entry
        return session.assembler.representatives
    skip = (
        ismrmrd.ACQ_IS_NOISE_MEASUREMENT,
        ismrmrd.ACQ_IS_NAVIGATION_DATA,
        ismrmrd.ACQ_IS_PHASECORR_DATA,
        ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
    )
    centre = tuple(
        scan.encoding_limits.get(name, (0, 0, 0))[1]
        for name in ("kspace_encoding_step_1", "kspace_encoding_step_2")
    )
    best: dict[tuple, tuple[int, Any]] = {}
    for a in session.acquisitions:
        if a.encoding_space_ref != 0 or any(a.is_flag_set(f) for f in skip):
            continue
        key = tuple(int(getattr(a.idx, n)) for n in scan.batch_dims)
        d = abs(int(a.idx.kspace_encode_step_1) - centre[0]) + abs(
            int(a.idx.kspace_encode_step_2) - centre[1]
        )
        if key not in best or d < best[key][0]:
            best[key] = (d, a)
    return {k: v[1] for k, v in best.items()}


def _image_recon(session: Session, method: str) -> list[Any]:
    """Reconstruct and return the image: series 1 magnitude, series 2 phase (radians).

    Layout (as FIRE's python-ismrmrd-server examples and Gadgetron return images): 2D scans give
    one 2D image per slice (and per other batch entry); a 3D scan gives one 3D image per batch
    entry, ``matrix_size`` (x, y, z), its position the volume centre and ``field_of_view[2]``
    the slab. The recon array ``(…, [z,] y, x)`` goes into ``data[0, z, y, x]`` unchanged (x,
    the readout, fastest; no display flips). Phase is float32 radians in [-π, π] with
    ``image_type`` IMTYPE_PHASE, as Gadgetron's float images carry it before any conversion to
    the scanner's fixed-point range.
    """
    import ismrmrd

    from ..recon import reconstruct

    t0 = time.perf_counter()
    scan = _scan_from_session(session)
    # without any noise the reply says "not prewhitened: <why>"; no warning on the server too
    whiten = scan.noise is not None or scan.noise_covariance is not None
    result, _maps = reconstruct(scan, method, whiten=whiten)  # 2nd value: coil maps, not image
    session.stage(method, time.perf_counter() - t0)
    note = prewhitening_note(scan, "prewhiten" in result.settings.get("pipeline", ()))
    session.log.append(f"{method}: {note}")
    img = result.image.detach().cpu().numpy()
    spatial = img.shape[img.ndim - scan.ndim :]
    frames = img.reshape(-1, *spatial)
    batch_shape = img.shape[: img.ndim - scan.ndim]
    sources = _representative_acquisitions(session, scan)
    out: list[Any] = []
    for series, part, kind in (
        (1, np.abs, ismrmrd.IMTYPE_MAGNITUDE),
        (2, np.angle, ismrmrd.IMTYPE_PHASE),
    ):
        if kind == ismrmrd.IMTYPE_PHASE and not np.iscomplexobj(img):
            continue
        suffix = "" if kind == ismrmrd.IMTYPE_MAGNITUDE else "_phase"
        meta = {
            "DataRole": "Image",
            "SeriesDescription": f"qmrkit_{method}{suffix}",
            "ImageComment": note,
            "ImageProcessingHistory": ["qmrkit", method],
        }
        if kind == ismrmrd.IMTYPE_PHASE:
            meta["Units"] = "rad"
        for i, frame in enumerate(frames):
            key = tuple(int(v) for v in np.unravel_index(i, batch_shape)) if batch_shape else ()
            geometry = image_geometry(session.header, sources.get(key))
            out.append(
                volume_to_image(
                    part(frame),
                    series_index=series,
                    image_index=i + 1,  # 1-based, as Gadgetron counts images
                    meta=meta,
                    geometry=geometry,
                    image_type=kind,
                )
            )
    out.append(
        f"{method}: {len(frames)} image(s) {tuple(spatial)} in {time.perf_counter() - t0:.2f} s"
    )
    return out


@register("sense")
def _sense(session: Session, arg: str | None) -> list[Any]:
    return _image_recon(session, "sense")


@register("tv")
def _tv(session: Session, arg: str | None) -> list[Any]:
    return _image_recon(session, "tv")


@register("gridding")
def _gridding(session: Session, arg: str | None) -> list[Any]:
    return _image_recon(session, "gridding")
