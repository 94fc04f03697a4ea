"""BIDS datasets in, BIDS-derivatives datasets out (a small own index, no pybids).

Why an own index
----------------
qmrkit needs a narrow part of BIDS: the entities of a file name, the suffix, the JSON sidecar
metadata with the *inheritance principle*, and the ``.bval``/``.bvec`` of a DWI series. pybids
answers that and much more, but it pulls in SQLAlchemy, formulaic, bids-validator and a database
built per dataset (seconds to minutes on large studies, on every Dask worker that would open it).
This module is ~400 lines, reads only file names and small JSON files, and its objects pickle
cheaply to workers. Where a dataset needs more (e.g. ``.bidsignore`` rules, derivatives as inputs)
pybids remains the tool to convert it first.

File collections understood per model (BIDS qMRI, BEP001 conventions)
---------------------------------------------------------------------
============  =============================================================================
model         inputs (``anat/`` unless stated; each sidecar field in BIDS units, seconds)
============  =============================================================================
molli, ir     ``*_inv-<i>_MOLLI`` or ``*_inv-<i>_IRT1`` file collection (one image each,
              ``InversionTime`` a number), or one 4D ``*_MOLLI``/``*_IRT1`` whose sidecar has
              ``InversionTime`` as a list (one per volume). ``MOLLI`` is not a BIDS suffix; it
              is accepted as the natural name of a Look-Locker series.
vfa           ``*_flip-<i>_VFA`` collection (``FlipAngle`` in degrees, ``RepetitionTimeExcitation``
              or else ``RepetitionTime`` in s) or one 4D ``*_VFA`` with ``FlipAngle`` a list.
t2            ``*_echo-<i>_MESE`` collection (``EchoTime``) or a 4D ``*_MESE`` (``EchoTime`` list).
t2star,       ``*_echo-<i>_MEGRE`` collection or a 4D ``*_MEGRE``.
r2star
dti, nexi,    ``dwi/*_dwi.nii.gz`` with ``.bval``/``.bvec`` (found by inheritance too) and the
others        sidecar's ``SmallDelta``/``BigDelta`` (s) where the model needs them.
============  =============================================================================

A collection is grouped by its remaining entities (``acq``, ``ce``, ``rec``, ``run``, ``part``
and the rest): ``sub-01_acq-fast_inv-1_MOLLI`` and ``sub-01_acq-slow_inv-1_MOLLI`` are two inputs.
Times are converted from seconds (BIDS) to milliseconds (qmrkit) when read.

Derivatives written (see :func:`derivative_name`, :func:`write_dataset_description`)
------------------------------------------------------------------------------------
``<out>/dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy``,
``SourceDatasets``, ``DatasetLinks``), and per input
``sub-X[/ses-Y]/<datatype>/sub-X[_ses-Y][_acq-..][_run-..]_<suffix>.nii.gz`` + ``.json`` with
``Units``, ``Sources`` (BIDS URIs into the raw dataset) and the fit's provenance. Maps whose name
is a BIDS qMRI suffix (``T1map``, ``M0map``, ``T2map``, ``T2starmap``, ``R2starmap``, ``S0map``)
are BIDS files; the others (the residual, the MOLLI ``A``/``B``/``T1star`` maps, diffusion maps in
the BEP016 ``model-<m>_param-<p>_dwimap`` form, not yet in the released specification) are kept
under the same naming rules and listed in ``.bidsignore``, as BIDS provides for such files.

Units of the derivatives: BIDS maps are written in the units the specification defines for their
suffix (``src/schema/objects/suffixes.yaml``: ``T1map``, ``T2map``, ``T2starmap`` in seconds,
``R1map``, ``R2map``, ``R2starmap`` in 1/s, ``M0map``/``S0map``/``PDmap`` arbitrary), so qmrkit's
ms maps are divided by 1000 on the way out (:func:`to_bids_units`, the one place this happens) and
``Units`` says ``"s"``; the non-BIDS maps keep qmrkit's units (times in ms), stated in their
``Units``. Both directions cross the boundary once: seconds in (sidecar times → ms, above),
seconds out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataFileError, ParameterError

#: BIDS entities in the order the specification puts them in a file name (the ones qmrkit may
#: meet in raw anat/dwi data and writes in derivatives)
ENTITY_ORDER: tuple[str, ...] = (
    "sub",
    "ses",
    "task",
    "acq",
    "ce",
    "trc",
    "stain",
    "rec",
    "dir",
    "run",
    "mod",
    "echo",
    "flip",
    "inv",
    "mt",
    "part",
    "recording",
    "chunk",
    "space",
    "res",
    "den",
    "label",
    "model",
    "param",
    "desc",
)

#: BIDS version the derivatives' dataset_description.json declares
BIDS_VERSION = "1.10.0"

#: the unit the BIDS specification defines for each quantitative-MRI map suffix qmrkit may write
#: (bids-specification ``src/schema/objects/suffixes.yaml``, the ``unit`` of each suffix: relaxation
#: times in seconds, rates in 1/s, amplitudes arbitrary; ``s`` and ``1/s`` are also the CMIXF
#: spellings the common principles recommend for ``Units``)
BIDS_MAP_UNITS: dict[str, str] = {
    "T1map": "s",
    "T2map": "s",
    "T2starmap": "s",
    "R1map": "1/s",
    "R2map": "1/s",
    "R2starmap": "1/s",
    "PDmap": "arbitrary",
    "M0map": "arbitrary",
    "S0map": "arbitrary",
}

#: map stems (``FitResult.map_names`` values) that are BIDS quantitative-MRI suffixes
BIDS_MAP_SUFFIXES = frozenset(BIDS_MAP_UNITS)

#: (qmrkit unit, BIDS unit) -> (multiplier, divisor) taking a qmrkit value to the BIDS value.
#: Integers, so that ms -> s is one correctly rounded float division by 1000 (``x * 1e-3`` would
#: round twice and differ from ``x / 1000`` in the last bit for some values).
_TO_BIDS_UNIT: dict[tuple[str, str], tuple[int, int]] = {
    ("ms", "s"): (1, 1000),
    ("s", "s"): (1, 1),
    ("1/ms", "1/s"): (1000, 1),
    ("1/s", "1/s"): (1, 1),
    ("a.u.", "arbitrary"): (1, 1),
    ("", "arbitrary"): (1, 1),
    ("arbitrary", "arbitrary"): (1, 1),
}

_NAME = re.compile(
    r"^(?P<body>(?:[a-zA-Z0-9]+-[a-zA-Z0-9]+_)*)(?P<suffix>[a-zA-Z0-9]+)(?P<ext>\..+)$"
)
_DATATYPES = ("anat", "dwi", "fmap", "func", "perf")


@dataclass(frozen=True)
class BidsFile:
    """One file of a BIDS dataset: its path and what its name says.

    Attributes
    ----------
    path : Path
        Absolute path.
    relpath : str
        Path relative to the dataset root (posix).
    entities : dict
        ``{"sub": "01", "ses": "1", "inv": "2", ...}`` in name order.
    suffix : str
        E.g. ``"MOLLI"``, ``"dwi"``.
    extension : str
        E.g. ``".nii.gz"``, ``".json"``.
    datatype : str or None
        The folder (``"anat"``, ``"dwi"``, ...) for data files; None for top-level files.
    """

    path: Path
    relpath: str
    entities: dict[str, str]
    suffix: str
    extension: str
    datatype: str | None


def parse_name(name: str) -> tuple[dict[str, str], str, str]:
    """``"sub-01_ses-1_inv-2_MOLLI.nii.gz"`` → ``({"sub": "01", "ses": "1", "inv": "2"},
    "MOLLI", ".nii.gz")``.

    Raises
    ------
    ParameterError
        If the name is not ``key-value_..._suffix.ext`` or repeats an entity.
    """
    m = _NAME.match(name)
    if not m:
        raise ParameterError(
            f"{name!r} is not a BIDS file name (expected key-value pairs joined by '_', a "
            "suffix and an extension, e.g. sub-01_inv-1_MOLLI.nii.gz)"
        )
    entities: dict[str, str] = {}
    for pair in filter(None, m["body"].split("_")):
        key, value = pair.split("-", 1)
        if key in entities:
            raise ParameterError(f"{name!r} repeats the entity {key!r}")
        entities[key] = value
    return entities, m["suffix"], m["ext"]


def build_name(entities: Mapping[str, str], suffix: str, extension: str) -> str:
    """A file name with ``entities`` in BIDS order (unknown keys after the known ones, sorted)."""
    known = [k for k in ENTITY_ORDER if k in entities]
    extra = sorted(k for k in entities if k not in ENTITY_ORDER)
    parts = [f"{k}-{entities[k]}" for k in known + extra]
    return "_".join([*parts, suffix]) + extension


class BidsDataset:
    """An index of a BIDS dataset's subject data and sidecars (file names only; nothing is read
    until :meth:`metadata` is asked).

    Parameters
    ----------
    root : str or Path
        Folder holding ``dataset_description.json`` and ``sub-*`` folders.

    Raises
    ------
    DataFileError
        If ``root`` is not a folder or holds no ``sub-*`` folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise DataFileError(f"BIDS root {self.root} is not a folder")
        self.files: list[BidsFile] = []
        # sidecars and gradient files anywhere from the root down (inheritance)
        self._meta: list[BidsFile] = []
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts) or rel.parts[0] in (
                "derivatives",
                "sourcedata",
                "code",
            ):
                continue
            if not p.is_file() or p.name == "dataset_description.json":
                continue
            try:
                ents, suffix, ext = parse_name(p.name)
            except ParameterError:
                continue  # README, CHANGES, participants.tsv...: not indexed
            datatype = (
                rel.parts[-2] if len(rel.parts) >= 2 and rel.parts[-2] in _DATATYPES else None
            )
            f = BidsFile(p, rel.as_posix(), ents, suffix, ext, datatype)
            if ext in (".json", ".bval", ".bvec"):
                self._meta.append(f)
            if ext != ".json" and "sub" in ents:
                self.files.append(f)
        if not any(f.entities.get("sub") for f in self.files):
            raise DataFileError(
                f"{self.root} holds no subject data (expected sub-<label>/[ses-<label>/]<datatype>/ "
                "files such as sub-01/anat/sub-01_inv-1_MOLLI.nii.gz)"
            )

    def subjects(self) -> list[str]:
        """Subject labels (without ``sub-``), sorted."""
        return sorted({f.entities["sub"] for f in self.files})

    def get(
        self,
        *,
        suffix: str | Iterable[str] | None = None,
        extension: str | Iterable[str] | None = None,
        datatype: str | None = None,
        **entities: str,
    ) -> list[BidsFile]:
        """Data files matching every given filter (an entity given as ``None`` must be absent)."""
        suffixes = {suffix} if isinstance(suffix, str) else set(suffix or ())
        exts = {extension} if isinstance(extension, str) else set(extension or ())
        out = []
        for f in self.files:
            if suffixes and f.suffix not in suffixes:
                continue
            if exts and f.extension not in exts:
                continue
            if datatype and f.datatype != datatype:
                continue
            if any(f.entities.get(k) != v for k, v in entities.items()):
                continue
            out.append(f)
        return out

    def _applicable(self, target: BidsFile, extension: str) -> list[BidsFile]:
        """Files of ``extension`` that apply to ``target`` by the inheritance principle, least
        specific first: same suffix, entities a subset of the target's, in a folder on the
        target's path from the root."""
        tdir = target.path.parent
        tents = target.entities
        found = []
        for f in self._meta:
            if f.extension != extension or f.suffix != target.suffix or f.path == target.path:
                continue
            fdir = f.path.parent
            if fdir != tdir and fdir not in tdir.parents:
                continue
            fents = f.entities
            if all(tents.get(k) == v for k, v in fents.items()):
                found.append((len(fdir.parts), len(fents), f))
        found.sort(key=lambda t: (t[0], t[1]))
        for (d1, n1, a), (d2, n2, b) in zip(found, found[1:], strict=False):
            if (d1, n1) == (d2, n2):  # the specification forbids two at one level
                raise DataFileError(
                    f"two {extension} files apply to {target.relpath} at the same level: "
                    f"{a.relpath} and {b.relpath} (BIDS inheritance allows one per level)"
                )
        return [f for *_, f in found]

    def metadata(self, target: BidsFile) -> dict[str, Any]:
        """The sidecar metadata of ``target``: every applicable JSON, the more specific (deeper
        folder, more entities) overriding the less specific key by key."""
        meta: dict[str, Any] = {}
        for f in self._applicable(target, ".json"):
            try:
                content = json.loads(f.path.read_text())
            except (OSError, ValueError) as exc:
                raise DataFileError(f"sidecar {f.relpath} is not valid JSON: {exc}") from exc
            if not isinstance(content, dict):
                raise DataFileError(f"sidecar {f.relpath} must hold a JSON object")
            meta.update(content)
        return meta

    def sidecar_sources(self, target: BidsFile) -> list[str]:
        """Paths (relative to the root) of the JSON files :meth:`metadata` merges."""
        return [f.relpath for f in self._applicable(target, ".json")]

    def associated(self, target: BidsFile, extension: str) -> BidsFile | None:
        """The most specific applicable ``.bval``/``.bvec`` (or other) file of ``target``."""
        found = self._applicable(target, extension)
        return found[-1] if found else None

    def uri(self, f: BidsFile | str) -> str:
        """BIDS URI of a raw file, ``bids:raw:sub-01/anat/sub-01_MOLLI.nii.gz`` (``raw`` is
        declared in the derivatives' ``DatasetLinks``)."""
        return f"bids:raw:{f if isinstance(f, str) else f.relpath}"


# -- inputs per model ------------------------------------------------------------------------------
#: model key -> (suffixes, collection entity, sidecar field of the varying setting, setting name)
RELAXOMETRY_INPUTS: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "molli": (("MOLLI", "IRT1"), "inv", "InversionTime", "ti"),
    "ir": (("IRT1", "MOLLI"), "inv", "InversionTime", "ti"),
    "vfa": (("VFA",), "flip", "FlipAngle", "flip_angles"),
    "t2": (("MESE",), "echo", "EchoTime", "te"),
    "t2star": (("MEGRE",), "echo", "EchoTime", "te"),
    "r2star": (("MEGRE",), "echo", "EchoTime", "te"),
    "monoexp": (("MESE", "MEGRE"), "echo", "EchoTime", "te"),
}

#: sidecar fields in seconds that qmrkit takes in milliseconds
_SECONDS = {"InversionTime", "EchoTime", "RepetitionTimeExcitation", "RepetitionTime"}


@dataclass
class SubjectInput:
    """The inputs of one fit: a subject/session and the files the model needs.

    Attributes
    ----------
    subject, session : str
        Labels without ``sub-``/``ses-`` (session ``None`` when the dataset has none).
    entities : dict
        Entities shared by the inputs (``sub``, ``ses``, ``acq``, ``run``, ...): the derivative's.
    datatype : str
        ``"anat"`` or ``"dwi"``.
    files : list of Path
        Images in measurement order (one 4D file, or one per measurement).
    settings : dict
        Acquisition settings in qmrkit units (``ti``/``te``/``tr`` ms, ``flip_angles`` degrees).
    dwi : dict
        For diffusion: ``{"bval": Path, "bvec": Path, "metadata": dict}``.
    sources : list of str
        BIDS URIs of every raw file used (images, sidecars, gradients).
    error : str or None
        Why this input cannot be fitted (``"DataFileError: ..."``), found while indexing; a batch
        reports it as this input's failure.
    """

    subject: str
    session: str | None
    entities: dict[str, str]
    datatype: str
    files: list[Path]
    settings: dict[str, Any] = field(default_factory=dict)
    dwi: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def label(self) -> str:
        """``sub-01_ses-1_acq-fast`` (unique per input: used for tasks and logs)."""
        return build_name(self.entities, "", "").rstrip("_")


def _ms(field_name: str, value: Any, where: str) -> Any:
    """A sidecar time (s) in ms; a value that is clearly already in ms is an error, not a guess."""
    vals = value if isinstance(value, list) else [value]
    try:
        nums = [float(v) for v in vals]
    except (TypeError, ValueError):
        raise ParameterError(
            f"{where}: {field_name} must be a number or list, got {value!r}"
        ) from None
    if any(v > 100 for v in nums):  # 100 s: no MR time is that long
        raise ParameterError(
            f"{where}: {field_name} = {value} looks like milliseconds; BIDS times are in seconds"
        )
    ms = [v * 1000.0 for v in nums]
    return ms if isinstance(value, list) else ms[0]


def _value(meta: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in meta:
        raise ParameterError(f"{where}: the sidecar metadata lack {key} (BIDS field, needed here)")
    v = meta[key]
    return _ms(key, v, where) if key in _SECONDS else v


def _nifti_volumes(path: Path) -> int:
    import nibabel as nib

    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:  # nibabel raises many kinds
        raise DataFileError(f"cannot read NIfTI header of {path}: {exc}") from exc
    return int(shape[3]) if len(shape) >= 4 else 1


def find_inputs(
    dataset: BidsDataset,
    model: str,
    *,
    participant_label: Sequence[str] | None = None,
    session_label: Sequence[str] | None = None,
) -> list[SubjectInput]:
    """Every input of ``model`` in ``dataset`` (module docs list the conventions), sorted by label.

    Problems found in one input (missing sidecar field, inconsistent collection) do not stop the
    search: such an input gets ``error`` set, so a batch reports it as a failed subject while the
    others run.

    Raises
    ------
    ParameterError
        A requested participant is not in the dataset, or the model has no BIDS convention.
    """
    from ..models.registry import check_name, is_diffusion

    key = check_name(model)
    subjects = dataset.subjects()
    wanted = [s.removeprefix("sub-") for s in participant_label or subjects]
    missing = sorted(set(wanted) - set(subjects))
    if missing:
        raise ParameterError(
            f"participant(s) {', '.join(missing)} not in {dataset.root} (it has: "
            f"{', '.join(subjects)})"
        )
    sessions = {s.removeprefix("ses-") for s in session_label} if session_label else None
    if is_diffusion(key):
        found = _find_dwi(dataset, key, wanted)
    elif key in RELAXOMETRY_INPUTS:
        found = _find_relaxometry(dataset, key, wanted)
    else:
        raise ParameterError(f"model {key!r} has no BIDS input convention")
    if sessions is not None:
        found = [i for i in found if i.session in sessions]
    return sorted(found, key=lambda i: i.label)


def _group_key(f: BidsFile, drop: str) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in f.entities.items() if k != drop)


def _find_relaxometry(dataset: BidsDataset, key: str, subjects: list[str]) -> list[SubjectInput]:
    suffixes, coll, field_name, setting = RELAXOMETRY_INPUTS[key]
    images = [
        f
        for f in dataset.get(suffix=suffixes, extension=(".nii.gz", ".nii"), datatype="anat")
        if f.entities["sub"] in subjects
    ]
    groups: dict[tuple, list[BidsFile]] = {}
    for f in images:
        groups.setdefault((f.suffix, _group_key(f, coll)), []).append(f)
    out = []
    for (suffix, gkey), files in groups.items():
        ents = dict(gkey)
        item = SubjectInput(ents["sub"], ents.get("ses"), ents, "anat", [])
        where = f"{item.label} ({suffix})"
        try:
            _fill_relaxometry(dataset, item, files, coll, field_name, setting, key, where)
        except (ParameterError, DataFileError) as exc:
            item.error = f"{type(exc).__name__}: {exc}"
            item.files = [f.path for f in files]
        out.append(item)
    # one input per subject/session/acq/run: MOLLI wins over IRT1 for molli, the reverse for ir
    chosen: dict[str, SubjectInput] = {}
    for item in out:
        chosen.setdefault(item.label, item)
    return list(chosen.values())


def _fill_relaxometry(
    dataset: BidsDataset,
    item: SubjectInput,
    files: list[BidsFile],
    coll: str,
    field_name: str,
    setting: str,
    key: str,
    where: str,
) -> None:
    metas = [dataset.metadata(f) for f in files]
    if len(files) == 1 and coll not in files[0].entities:
        f, meta = files[0], metas[0]
        values = _value(meta, field_name, f.relpath)
        n = _nifti_volumes(f.path)
        if not isinstance(values, list) or len(values) != n:
            raise ParameterError(
                f"{f.relpath}: a 4D series needs {field_name} as a list of {n} values (one per "
                f"volume) in its sidecar, got {meta.get(field_name)!r}"
            )
        ordered = [f]
    else:
        if any(coll not in f.entities for f in files):
            raise ParameterError(
                f"{where}: mixes files with and without the {coll}- entity: "
                f"{', '.join(f.relpath for f in files)}"
            )
        vals = []
        for f, meta in zip(files, metas, strict=True):
            v = _value(meta, field_name, f.relpath)
            if isinstance(v, list) or _nifti_volumes(f.path) != 1:
                raise ParameterError(
                    f"{f.relpath}: each file of a {coll}- collection is one image with one "
                    f"{field_name}, got {v!r}"
                )
            vals.append(v)
        # measurement order = the setting's order (the index is only a label in BIDS)
        order = sorted(range(len(files)), key=lambda i: vals[i])
        ordered = [files[i] for i in order]
        values = [vals[i] for i in order]
        metas = [metas[i] for i in order]
    item.files = [f.path for f in ordered]
    item.settings[setting] = values
    if key == "vfa":
        meta = metas[0]
        tr_key = (
            "RepetitionTimeExcitation" if "RepetitionTimeExcitation" in meta else "RepetitionTime"
        )
        trs = {json.dumps(_value(m, tr_key, where)) for m in metas}
        if len(trs) != 1:
            raise ParameterError(f"{where}: the VFA images have different {tr_key}: {sorted(trs)}")
        tr = _value(meta, tr_key, where)
        item.settings["tr"] = tr[0] if isinstance(tr, list) else tr
    srcs = [dataset.uri(f) for f in ordered]
    for f in ordered:
        srcs += [dataset.uri(s) for s in dataset.sidecar_sources(f)]
    item.sources = list(dict.fromkeys(srcs))


def _find_dwi(dataset: BidsDataset, key: str, subjects: list[str]) -> list[SubjectInput]:
    out = []
    for f in dataset.get(suffix="dwi", extension=(".nii.gz", ".nii"), datatype="dwi"):
        if f.entities["sub"] not in subjects:
            continue
        ents = dict(f.entities)
        item = SubjectInput(ents["sub"], ents.get("ses"), ents, "dwi", [f.path])
        srcs = [dataset.uri(f)]
        try:
            grads = {}
            for ext in (".bval", ".bvec"):
                g = dataset.associated(f, ext)
                if g is None:
                    raise DataFileError(f"{f.relpath} has no applicable {ext} file")
                grads[ext[1:]] = g.path
                srcs.append(dataset.uri(g))
            item.dwi = {**grads, "metadata": dataset.metadata(f)}
            srcs += [dataset.uri(s) for s in dataset.sidecar_sources(f)]
        except (ParameterError, DataFileError) as exc:
            item.error = f"{type(exc).__name__}: {exc}"
        item.sources = list(dict.fromkeys(srcs))
        out.append(item)
    return out


# -- derivatives -----------------------------------------------------------------------------------
def derivative_name(item: SubjectInput, stem: str, extension: str, model: str) -> tuple[str, str]:
    """Folder (relative to the derivatives root) and file name of the map ``stem`` (a
    ``FitResult.map_names`` value such as ``T1map``) of ``item``.

    The name keeps the input's entities except the ones that vary across a file collection
    (``echo``, ``flip``, ``inv``). Diffusion maps take BEP016's ``model-<m>_param-<p>_dwimap``
    form; relaxometry maps keep their stem as the suffix (``sub-01_T1map``; stems that are not BIDS
    suffixes, e.g. ``residual``, are listed in ``.bidsignore`` by :func:`update_bidsignore`).
    """
    ents = {k: v for k, v in item.entities.items() if k not in ("echo", "flip", "inv")}
    parts = [f"sub-{item.subject}"] + ([f"ses-{item.session}"] if item.session else [])
    folder = "/".join([*parts, item.datatype])
    if item.datatype == "dwi":
        param = re.sub(r"[^a-zA-Z0-9]", "", stem.removesuffix("map")) or "map"
        name = build_name({**ents, "model": model, "param": param}, "dwimap", extension)
    else:
        name = build_name(ents, re.sub(r"[^a-zA-Z0-9]", "", stem), extension)
    return folder, name


def to_bids_units(nifti: str | Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Put one derivative map in the unit BIDS defines for its suffix (in place), returning its
    sidecar metadata with ``Units`` set to match.

    The one place where qmrkit's units (times in ms, see ``shared/DESIGN.md``) become BIDS units:
    a map named by a BIDS qMRI suffix (:data:`BIDS_MAP_UNITS`) is converted, e.g. ``T1map``
    from ms to s (each voxel ``/ 1000``, NaN kept, the file's float dtype kept), rates already in
    1/s unchanged, amplitudes relabelled ``arbitrary``. Any other map (``Amap``, ``T1starmap``,
    ``residual``, ``dwimap``... : listed in ``.bidsignore``) keeps qmrkit's unit, which its
    ``Units`` states.

    Parameters
    ----------
    nifti : str or Path
        The map, already under its derivative name (``sub-01_T1map.nii.gz``): its suffix decides.
        Rewritten when its values change (callers pass a staged copy, not a published file).
    meta : mapping
        Its sidecar as ``qmrkit fit`` wrote it; ``Units`` is the map's qmrkit unit.

    Returns
    -------
    dict
        A copy of ``meta`` with ``Units`` in BIDS's unit for BIDS maps.

    Raises
    ------
    DataFileError
        If the sidecar has no ``Units``, or a BIDS map's unit has no known conversion to BIDS's.
    """
    import nibabel as nib
    import numpy as np

    path = Path(nifti)
    _, suffix, _ = parse_name(path.name)
    out = dict(meta)
    if "Units" not in out:
        raise DataFileError(f"{path.name}: its sidecar has no Units, so it cannot be put in BIDS")
    if suffix not in BIDS_MAP_UNITS:
        return out
    unit, bids_unit = str(out["Units"]), BIDS_MAP_UNITS[suffix]
    if (unit, bids_unit) not in _TO_BIDS_UNIT:
        raise DataFileError(
            f"{path.name}: a BIDS {suffix} is in {bids_unit!r}, but the map is in {unit!r} "
            f"(known conversions to {bids_unit!r}: "
            f"{sorted(u for u, b in _TO_BIDS_UNIT if b == bids_unit)})"
        )
    mul, div = _TO_BIDS_UNIT[(unit, bids_unit)]
    out["Units"] = bids_unit
    if mul == div == 1:
        return out
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj)
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataFileError(f"{path.name}: a {suffix} must hold floats to rescale, got {arr.dtype}")
    # in the map's own dtype (float32 as qmrkit writes maps): one rounding per voxel
    scaled = arr * arr.dtype.type(mul) if mul != 1 else arr
    scaled = scaled / arr.dtype.type(div) if div != 1 else scaled
    new = nib.Nifti1Image(scaled, None, header=img.header)  # same affine, codes, dtype
    new.header["descrip"] = f"qmrkit {suffix} [{bids_unit}]".encode("ascii", "replace")[:80]
    nib.save(new, str(path))
    return out


def units_problem(name: str, meta: Mapping[str, Any]) -> str | None:
    """What is wrong with the ``Units`` of the derivative ``name``'s sidecar ``meta`` (None when
    nothing): every map states its unit, and a BIDS map's is the one BIDS defines for its suffix
    (a ``T1map`` in ``"ms"`` was written before qmrkit converted to BIDS units)."""
    if "Units" not in meta:
        return f"{name}: lacks Units"
    _, suffix, _ = parse_name(name)
    want = BIDS_MAP_UNITS.get(suffix)
    if want is not None and meta["Units"] != want:
        return f"{name}: Units is {meta['Units']!r}, but BIDS defines {suffix} in {want!r}"
    return None


def ignore_patterns(names: Iterable[str]) -> list[str]:
    """``.bidsignore`` patterns for the written files whose suffix is not a BIDS map."""
    out = []
    for n in names:
        _, suffix, _ = parse_name(Path(n).name)
        if suffix not in BIDS_MAP_SUFFIXES:
            out.append(f"*_{suffix}.*")
    return sorted(set(out))


def update_bidsignore(out: str | Path, patterns: Iterable[str]) -> None:
    """Add ``patterns`` to ``out/.bidsignore`` (kept sorted, written atomically; one writer: the
    batch client)."""
    ignore = Path(out) / ".bidsignore"
    have = ignore.read_text().split() if ignore.exists() else []
    lines = sorted(set(have) | set(patterns) | set(BIDSIGNORE))
    if lines != have:
        _atomic_write_text(ignore, "\n".join(lines) + "\n")


#: the sentence qmrkit's derivatives README had while BIDS maps were written in ms
_LEGACY_README = "Times are in ms (each sidecar's Units says so)"

#: folders of the derivatives that are not BIDS data (logs of the batch, temporary files)
BIDSIGNORE = ("logs/", ".qmrkit-tmp/")


def write_dataset_description(
    out: str | Path, raw: BidsDataset, *, model: str, solver: str, extra: Mapping[str, Any] = ()
) -> Path:
    """Write ``dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy``,
    ``SourceDatasets`` and ``DatasetLinks.raw`` pointing at the raw dataset, relative when the
    derivatives live inside it) and ``.bidsignore`` of the derivatives folder ``out``; returns
    the description's path."""
    from .. import __version__

    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    desc = outp / "dataset_description.json"
    try:
        rel = Path(*[".."] * len(outp.resolve().relative_to(raw.root).parts))
        link = rel.as_posix() + "/"
    except ValueError:  # the derivatives live outside the raw dataset
        link = raw.root.as_uri() + "/"
    raw_desc = {}
    if (raw.root / "dataset_description.json").exists():
        try:
            raw_desc = json.loads((raw.root / "dataset_description.json").read_text())
        except ValueError:
            raw_desc = {}
    content = {
        "Name": f"qmrkit maps of {raw_desc.get('Name', raw.root.name)}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "qmrkit",
                "Version": __version__,
                "Description": "qmrkit batch: 'qmrkit fit' per subject (each sidecar names "
                "its Model and Solver)",
            }
        ],
        # the source is named by a BIDS URI whose dataset "raw" DatasetLinks resolves
        "SourceDatasets": [
            {
                "URL": "bids:raw:",
                **({"Version": raw_desc["DatasetVersion"]} if "DatasetVersion" in raw_desc else {}),
            }
        ],
        "DatasetLinks": {"raw": link},
        **dict(extra),
    }
    _atomic_write_text(desc, json.dumps(content, indent=2) + "\n")
    readme = outp / "README"
    # a README of ours from before BIDS units said the opposite of what the maps now are: replace
    # it (any other existing README is the user's and is kept)
    if not readme.exists() or _LEGACY_README in readme.read_text(errors="replace"):
        _atomic_write_text(
            readme,
            f"Parametric maps of {raw_desc.get('Name', raw.root.name)} written by qmrkit "
            f"{__version__} ('qmrkit batch --model {model}', solver {solver}). Maps named by a "
            "BIDS qMRI suffix are in the units BIDS defines: T1map, T2map, T2starmap in s; "
            "R1map, R2map, R2starmap in 1/s; M0map, S0map, PDmap arbitrary. The other maps "
            "(listed in .bidsignore) keep qmrkit's units, times in ms. Each sidecar's Units "
            "states its map's unit. logs/ holds one JSON record per fitted input.\n",
        )
    update_bidsignore(outp, ())
    return desc


def _atomic_write_text(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: readers never see half a file."""
    import os
    import uuid

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_derivatives(out: str | Path) -> list[str]:
    """Problems of a derivatives folder against the BIDS-derivatives rules qmrkit follows (empty
    when none): ``dataset_description.json`` with ``Name``, ``BIDSVersion``, ``DatasetType``
    ``"derivative"``, ``GeneratedBy`` (with ``Name``) and ``SourceDatasets``; every data file under
    ``sub-<label>[/ses-<label>]/<datatype>/`` whose name starts with its folders' entities, has
    entities in BIDS order and no repeats; every NIfTI with a JSON sidecar holding ``Units`` and
    ``Sources``, ``Units`` being BIDS's for a BIDS map (``"s"`` for ``T1map``/``T2map``/
    ``T2starmap``, ``"1/s"`` for the rates: :data:`BIDS_MAP_UNITS`); files not covered by
    ``.bidsignore`` carry a BIDS qMRI suffix."""
    import fnmatch

    outp = Path(out)
    problems: list[str] = []
    desc = outp / "dataset_description.json"
    if not desc.exists():
        return [f"{desc} is missing"]
    d = json.loads(desc.read_text())
    for k in ("Name", "BIDSVersion", "GeneratedBy", "SourceDatasets"):
        if k not in d:
            problems.append(f"dataset_description.json lacks {k}")
    if d.get("DatasetType") != "derivative":
        problems.append(f"DatasetType is {d.get('DatasetType')!r}, not 'derivative'")
    if not (isinstance(d.get("GeneratedBy"), list) and all("Name" in g for g in d["GeneratedBy"])):
        problems.append("GeneratedBy must be a list of objects with Name")
    ignore = (outp / ".bidsignore").read_text().split() if (outp / ".bidsignore").exists() else []
    for p in sorted(outp.rglob("*")):
        rel = p.relative_to(outp)
        if (
            p.is_dir()
            or rel.parts[0].startswith(".")
            or rel.name
            in (
                "dataset_description.json",
                ".bidsignore",
                "README",
                "README.md",
                "CHANGES",
            )
        ):
            continue
        if any(rel.as_posix().startswith(i) for i in ignore if i.endswith("/")):
            continue
        try:
            ents, suffix, ext = parse_name(rel.name)
        except ParameterError as exc:
            problems.append(str(exc))
            continue
        folders = rel.parts[:-1]
        if not folders or not folders[0].startswith("sub-") or folders[-1] not in _DATATYPES:
            problems.append(f"{rel}: not under sub-<label>[/ses-<label>]/<datatype>/")
            continue
        expect = [f.split("-", 1) for f in folders[:-1]]
        if list(ents.items())[: len(expect)] != [tuple(e) for e in expect]:
            problems.append(f"{rel}: name does not start with its folders' entities")
        if build_name(ents, suffix, ext) != rel.name:
            problems.append(f"{rel}: entities not in BIDS order")
        ignored = any(fnmatch.fnmatch(rel.name, i) for i in ignore if not i.endswith("/"))
        if not ignored and suffix not in BIDS_MAP_SUFFIXES:
            problems.append(f"{rel}: suffix {suffix!r} is not a BIDS map and not in .bidsignore")
        if ext in (".nii.gz", ".nii"):
            side = p.with_name(rel.name[: -len(ext)] + ".json")
            if not side.exists():
                problems.append(f"{rel}: no JSON sidecar")
                continue
            meta = json.loads(side.read_text())
            if "Sources" not in meta:
                problems.append(f"{side.name}: lacks Sources")
            if (bad := units_problem(side.name, meta)) is not None:
                problems.append(bad)
            if not all(
                isinstance(s, str) and s.startswith("bids:") for s in meta.get("Sources", [])
            ):
                problems.append(f"{side.name}: Sources must be BIDS URIs (bids:<dataset>:<path>)")
    return problems
