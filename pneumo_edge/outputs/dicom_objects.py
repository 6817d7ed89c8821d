"""DICOM result objects: a Structured Report per scored DICOM image (and, with a heatmap, an RGB
Secondary Capture of it), built with highdicom, for ``score --dicom-out DIR`` and the DICOM node.

**Where they go.** ``DIR/<source SOPInstanceUID>/<model sha256[:12]>.sr.dcm`` (and ``.sc.dcm``):
the name is a function of the source image and the model file, so whether the result of one
model for one image exists is one ``stat`` (:func:`existing_sr`). The SC is written first, the SR
last, each atomically (temporary file, fsync, rename); the SR is the commit mark: when it is on
disk both are. :func:`write_result_objects` keeps an SR that exists with the same threshold
(``--resume`` and a restarted node never make a second SR for the same source and model) and
replaces it, SC included, when the threshold differs (a rerun with another ``--threshold``).

**The SR** (Comprehensive SR, ``1.2.840.10008.5.1.4.1.1.88.33``) holds TID 1500 "Measurement
Report", highdicom's :class:`~highdicom.sr.MeasurementReport`: the template PACS viewers and
AI result consumers (e.g. OHIF, IHE AIR) read, and the only report template highdicom builds.
The one image-level finding has no region, so it is one TID 1501 measurement group (not a
planar or volumetric ROI group), with:

- Finding (DCM 121071) = SCT 233604007 "Pneumonia"; tracking identifier and UID;
- qualitative evaluation SCT 233604007 "Pneumonia" = SCT 52101004 "Present" or SCT 272519000
  "Absent" (DICOM CID 240 "Present-Absent"), from the label at the threshold;
- measurement DCM 122157 "Probability" = the positive class's probability, unit UCUM ``1``,
  rounded to the CSV's 6 decimals (a round trip reads back the CSV's number exactly);
- measurement DCM 122411 "Threshold Value" = the threshold used, unit UCUM ``1``;
- TID 4019 algorithm identification: name ``pneumo-edge``, its version, parameters giving the
  model file's name and sha256, runtime, precision, positive class, where the threshold came
  from (``card``, ``--threshold override`` or ``moved to --prevalence P``), and the
  prevalence and the input quality (qc) verdict when there are;
- the source image referenced from the group (SOP class + instance UID) and in the image
  library; procedure reported SCT 399208008 "Plain chest X-ray"; device observer ``pneumo-edge``
  (UID derived from the model's sha256);
- a root "Qualitative Evaluations" container (UMLS C0034375) with a Comment (DCM 121106):
  "RESEARCH USE ONLY. NOT FOR DIAGNOSTIC USE. ..."; the series description says the same.

Both objects join the source's study (same Study Instance UID; patient, study and equipment
modules copied from the source's header, which is why the PACS files them with the study; a
patient/study value that is not valid DICOM is written empty) in a new series per study and model (series UID derived from both; SR series number 9901, SC 9902),
with new random SOP Instance UIDs. The SC (RGB, 8 bit) references the source in Source Image
Sequence and has ``BurnedInAnnotation YES``: a banner with "NOT FOR DIAGNOSTIC USE" and the
probability is drawn into its pixels above the heatmap picture.

Patient data is copied into these objects only; reasons raised here (:class:`DicomOutError`)
name attributes, never values, and highdicom's and pydicom's warnings are silenced.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumo_edge.errors import PneumoError
from pneumo_edge.outputs.csvout import PROB_DIGITS

SR_SUFFIX, SC_SUFFIX = ".sr.dcm", ".sc.dcm"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
MANUFACTURER = "pneumo-edge"
SERIES_DESCRIPTION = "pneumo-edge: RESEARCH USE ONLY, NOT FOR DIAGNOSTIC USE"
STATEMENT = ("RESEARCH USE ONLY. NOT FOR DIAGNOSTIC USE. Produced by pneumo-edge, an automated "
             "research classifier; it has not been cleared by any regulator and must not be "
             "used to diagnose or treat patients.")
BANNER = "NOT FOR DIAGNOSTIC USE - research use only"
#: the CSV column (after the DICOM columns, before ``error``) with the SR's path
SR_COLUMN = "dicom_sr"
#: the source attributes an SR needs to reference the image and join its study
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
#: Type 2 patient/study attributes highdicom copies: empty when the source lacks them
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
          "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TRACKING_TEXT = "pneumo-edge pneumonia classification"


class DicomOutError(PneumoError):
    """No result objects for this source; ``str()`` is the reason (names tags, no values)."""


@dataclass(frozen=True)
class ResultInfo:
    """What one SR records about one scored image."""

    probability: float  # of the positive class
    label: str
    positive_class: str
    threshold: float
    threshold_source: str  # "card", "--threshold override" or "moved to --prevalence P"
    model_sha256: str
    model_file: str  # name only
    runtime: str
    precision: str
    version: str  # pneumo_edge.__version__
    prevalence: float | None = None  # calibration prevalence (issue 20), when known
    qc: str = ""  # input quality note, "" when none

    @classmethod
    def from_runtime(cls, runtime, probability: float, label: str, threshold: float,
                     threshold_source: str, **extra) -> ResultInfo:
        """The fields that come from an opened runtime (:mod:`pneumo_edge.runtimes`)."""
        from pneumo_edge import __version__

        return cls(probability=float(probability), label=label,
                   positive_class=runtime.card.positive_class, threshold=float(threshold),
                   threshold_source=threshold_source, model_sha256=runtime.sha256,
                   model_file=Path(runtime.path).name, runtime=runtime.name,
                   precision=runtime.precision, version=__version__, **extra)

    @classmethod
    def from_row(cls, runtime, row, head, threshold: float, threshold_source: str,
                 **extra) -> ResultInfo:
        """The SR's record of one scored CSV row (``head``: the CSV header): its label, its
        positive-class probability and, when ``head`` has the ``qc`` column, its verdict;
        ``score --dicom-out`` and the node both read their rows with this."""
        qc = row[list(head).index("qc")] if "qc" in head else ""
        return cls.from_runtime(runtime, float(row[2 + runtime.card.positive_index]), row[1],
                                threshold, threshold_source, qc=qc, **extra)

    @property
    def present(self) -> bool:
        return self.label == self.positive_class

    @property
    def rounded(self) -> float:
        """The probability as the CSV writes it."""
        return round(float(self.probability), PROB_DIGITS)


# --- where the objects are ---------------------------------------------------------------------

def object_paths(out_dir, sop_uid: str, model_sha256: str) -> tuple[Path, Path]:
    """(SR path, SC path) of the results of the model with ``model_sha256`` for the source image
    with SOP Instance UID ``sop_uid``."""
    if not (isinstance(sop_uid, str) and _UID.match(sop_uid) and len(sop_uid) <= 64):
        raise DicomOutError("the source's SOPInstanceUID is missing or not a valid UID")
    if not re.fullmatch(r"[0-9a-f]{12,}", model_sha256 or ""):
        raise ValueError("model_sha256 must be a hex digest")
    folder = Path(out_dir) / sop_uid
    stem = model_sha256[:12]
    return folder / (stem + SR_SUFFIX), folder / (stem + SC_SUFFIX)


def existing_sr(out_dir, sop_uid: str, model_sha256: str) -> Path | None:
    """The SR of this model for this source when it has been written, else None."""
    sr = object_paths(out_dir, sop_uid, model_sha256)[0]
    return sr if sr.is_file() and not sr.is_symlink() else None


# --- writing -------------------------------------------------------------------------------------

def write_result_objects(source, info: ResultInfo, out_dir, heatmap_rgb: np.ndarray | None = None,
                         *, sync: bool = True) -> list[Path]:
    """Write the SR (and, with ``heatmap_rgb`` uint8 ``[H, W, 3]``, the SC before it) for the
    DICOM image ``source`` (a path or a pydicom Dataset; its pixel data is not used) under
    ``out_dir`` (created when missing, its parent must exist); returns the paths, SR first.
    An SR already there with the same threshold is kept (nothing is written).
    ``sync`` False: nothing is fsynced and the files are written in place, not renamed in; for
    a private folder whose caller fsyncs the files and their folders before relying on them
    (the node's ``staging/``, a batch at a time: :mod:`pneumo_edge.dicomnode.worker`).

    :class:`DicomOutError`: this source cannot get objects (reason, no values); other
    :class:`PneumoError`: the files cannot be written."""
    header = _build(_evidence, source)
    sr_path, sc_path = object_paths(out_dir, header.SOPInstanceUID, info.model_sha256)
    if is_current(sr_path, info):
        return [sr_path] + ([sc_path] if sc_path.is_file() else [])
    _folder(Path(out_dir), sr_path.parent, sync)
    written = []
    if heatmap_rgb is not None:
        sc = _build(build_sc, header, info, heatmap_rgb)
        written.append(_save(sc, sc_path, sync))
    elif sc_path.is_file() and not sc_path.is_symlink():
        sc_path.unlink()  # the heatmap of the result being replaced (another threshold)
    sr = _build(result_sr, header, info)
    return [_save(sr, sr_path, sync), *written]


def _build(fn, *args):
    from pneumo_edge.inputs.dicom import _pydicom

    _pydicom()  # reading without validation warnings (a setting, no warnings filter)
    try:
        return fn(*args)
    except (DicomOutError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 -- a header value highdicom refuses: its text may
        # quote the value (patient data), so only its type
        raise DicomOutError(f"the source's header cannot be copied into a DICOM result "
                            f"({type(exc).__name__})") from None


def _folder(out_dir: Path, folder: Path, sync: bool = True) -> None:
    """Create ``out_dir`` (parent must exist) and ``folder`` in it; never through a link;
    ``sync``: fsync the parent of each folder created."""
    for d in (out_dir, folder):
        if os.path.islink(d) or (d.exists() and not d.is_dir()):
            raise PneumoError(f"{d}: is a symbolic link or not a folder (--dicom-out)")
        if not d.exists():
            if not d.parent.is_dir():
                raise PneumoError(f"{d.parent}: no such folder for --dicom-out")
            try:
                d.mkdir(exist_ok=True)
            except OSError as exc:
                raise PneumoError(f"{d}: cannot create ({exc.strerror or exc})") from None
            if sync:
                from pneumo_edge.atomic import fsync_dir

                fsync_dir(d.parent)


def _save(ds, path: Path, sync: bool = True) -> Path:
    """``ds`` as ``path``: atomically and fsynced, or (``sync`` False) written in place as a
    new file (what was there is removed; never through a link), not fsynced."""
    from pneumo_edge.atomic import write_atomic

    if sync:
        return write_atomic(path, lambda f: ds.save_as(f, enforce_file_format=True))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        path.unlink(missing_ok=True)  # a link itself, never its target
        with os.fdopen(os.open(path, flags, 0o666), "wb") as f:
            ds.save_as(f, enforce_file_format=True)
    except OSError as exc:
        raise PneumoError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def _evidence(source):
    """The source's header (no pixel data) with the attributes an SR needs; Type 2 patient and
    study attributes it lacks are added empty."""
    from pydicom.dataset import Dataset

    if isinstance(source, Dataset):
        header = Dataset()
        for elem in source:
            if elem.tag < 0x7FE00010:  # pixel data and anything after it stay behind
                header.add(elem)
        if hasattr(source, "file_meta"):
            header.file_meta = source.file_meta
    else:
        from pneumo_edge.inputs.dicom import DicomError, read_header

        try:
            header = read_header(source)
        except DicomError as exc:
            raise DicomOutError(str(exc)) from None
    missing = [k for k in _REQUIRED if not str(header.get(k, "") or "").strip()]
    if missing:
        raise DicomOutError(f"the source has no {missing[0]}: no DICOM result can reference it")
    for k in _TYPE2:
        if k not in header or not _valid(header, k):
            setattr(header, k, None)
    return header


def _valid(header, keyword: str) -> bool:
    """Whether a Type 2 patient/study value is valid DICOM (its VR's form and length, a real
    date or time, a sex of M/F/O, at most five name components): an invalid one is written
    empty, since highdicom refuses it or dciodvfy would reject the object."""
    from pydicom import config
    from pydicom.valuerep import DA, TM, validate_value

    try:
        elem = header[keyword]
        text = "" if elem.value is None else str(elem.value)
        if text:
            validate_value(elem.VR, elem.value, config.RAISE)
            {"DA": DA, "TM": TM}.get(elem.VR, str)(text)
        ok_sex = keyword != "PatientSex" or text in ("", "M", "F", "O")
        ok_name = elem.VR != "PN" or all(g.count("^") <= 4 for g in text.split("="))
        return ok_sex and ok_name
    except Exception:  # noqa: BLE001 -- any conversion failure: not valid
        return False


def is_current(sr_path: Path, info: ResultInfo) -> bool:
    """Whether the SR at ``sr_path`` is there (a regular file) and records ``info``'s
    threshold: :func:`write_result_objects` then keeps it."""
    if not (sr_path.is_file() and not sr_path.is_symlink()):
        return False
    try:
        return read_result(sr_path)["threshold"] == float(info.threshold)
    except Exception:  # noqa: BLE001 -- an unreadable SR is rewritten
        return False


# --- the objects -----------------------------------------------------------------------------

def _codes():
    from highdicom.sr import CodedConcept

    def c(value, scheme, meaning):
        return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)

    return {
        "pneumonia": c("233604007", "SCT", "Pneumonia"),
        "present": c("52101004", "SCT", "Present"),
        "absent": c("272519000", "SCT", "Absent"),
        "probability": c("122157", "DCM", "Probability"),
        "threshold": c("122411", "DCM", "Threshold Value"),
        "no_units": c("1", "UCUM", "no units"),
        "chest_xray": c("399208008", "SCT", "Plain chest X-ray"),
        "qualitative": c("C0034375", "UMLS", "Qualitative Evaluations"),
        "comment": c("121106", "DCM", "Comment"),
    }


def _parameters(info: ResultInfo) -> list[str]:
    out = [f"model file: {info.model_file}", f"model sha256: {info.model_sha256}",
           f"runtime: {info.runtime}", f"precision: {info.precision}",
           f"positive class: {info.positive_class}",
           f"threshold: {info.threshold:g} ({info.threshold_source})"]
    if info.prevalence is not None:
        out.append(f"prevalence: {info.prevalence:g}")
    if info.qc:
        out.append(f"input quality: {info.qc}")
    return out


def build_sr(header, info: ResultInfo):
    """The Comprehensive SR (a highdicom dataset) for ``header``, the source image's header,
    built in full by highdicom (:func:`result_sr` makes the same, faster)."""
    return _sr_shell(header, info, _content(header, info))


def _content(header, info: ResultInfo):
    """The SR's content tree: TID 1500's root container (see the module docstring)."""
    import highdicom as hd
    from highdicom.sr import (
        AlgorithmIdentification,
        ContainerContentItem,
        DeviceObserverIdentifyingAttributes,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        RelationshipTypeValues,
        SourceImageForMeasurementGroup,
        TextContentItem,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    k = _codes()
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=_TRACKING_TEXT),
        finding_type=k["pneumonia"],
        algorithm_id=AlgorithmIdentification(name="pneumo-edge", version=info.version,
                                             parameters=_parameters(info)),
        measurements=[Measurement(name=k["probability"], value=info.rounded, unit=k["no_units"]),
                      Measurement(name=k["threshold"], value=float(info.threshold),
                                  unit=k["no_units"])],
        qualitative_evaluations=[QualitativeEvaluation(
            k["pneumonia"], k["present"] if info.present else k["absent"])],
        source_images=[SourceImageForMeasurementGroup.from_source_image(header)],
    )
    device = DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["pneumo-edge device", info.model_sha256]),
        name="pneumo-edge", manufacturer_name=MANUFACTURER, model_name=info.model_file[:64])
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device)),
        procedure_reported=k["chest_xray"], imaging_measurements=[group],
        referenced_images=[header] if _library_ok(header) else None)
    notes = ContainerContentItem(name=k["qualitative"],
                                 relationship_type=RelationshipTypeValues.CONTAINS)
    notes.ContentSequence = [TextContentItem(name=k["comment"], value=STATEMENT,
                                             relationship_type=RelationshipTypeValues.CONTAINS)]
    report[0].ContentSequence.append(notes)
    return report[0]


# --- the SR, fast: highdicom builds the content once per model and result, then per image -------

#: concept codes of the content items that differ from image to image (see :func:`result_sr`)
_TRACKING, _TRACKING_UID, _SOURCE, _PROBABILITY = "112039", "112040", "121112", "122157"
_LIBRARY, _MEASUREMENTS = "111028", "126010"
_templates: dict = {}
_templates_lock = threading.Lock()


def result_sr(header, info: ResultInfo):
    """The same SR as :func:`build_sr` (a dataset), in a few milliseconds: the content tree
    :func:`build_sr` made once for this model, threshold, label and parameters (a template,
    never changed) is shared, and only what belongs to this image is built new by highdicom:
    the SR's own attributes and the patient, study and evidence modules
    (:class:`~highdicom.sr.ComprehensiveSR`, over a content root without the per-image
    items), the image library entry, the tracking identifier, the probability and the
    source image reference; the tree is assembled from new containers on the way to them.
    The template's items are also encoded once (pydicom's own item encoding), so writing the
    SR encodes only this image's items: the Content Sequences above them are raw elements,
    written as they are. ``tests/test_dicom_out.py`` checks it equals :func:`build_sr` item
    for item and byte for byte."""
    from highdicom.sr import (
        ImageLibrary,
        Measurement,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )

    root, head, group, notes, encoded = _template(header, info)
    k = _codes()
    new = {_TRACKING: TrackingIdentifier(uid=_new_uid(), identifier=_TRACKING_TEXT),
           _PROBABILITY: Measurement(name=k["probability"], value=info.rounded,
                                     unit=k["no_units"]),
           _SOURCE: [SourceImageForMeasurementGroup.from_source_image(header)]}
    items, done = [], set()
    for item in group.ContentSequence:  # same order as the template
        code = _code(item)
        code = _TRACKING if code == _TRACKING_UID else code
        if code not in new:
            items.append(item)
        elif code not in done:
            items.extend(new[code])
            done.add(code)
    if done != set(new):
        raise RuntimeError("the SR template lacks a per-image content item")  # a bug here
    library = list(ImageLibrary([header])) if _library_ok(header) else []
    sr = _sr_shell(header, info, _with_children(root, [notes]))  # cheap for highdicom to check
    shared = encoded(sr)
    if shared is None:  # not the encoding the template's bytes were made for
        sr.ContentSequence = [*head, *library, _with_children(
            root.ContentSequence[-2], [_with_children(group, items)]), notes]
        return sr
    # the template's items were encoded once: only this image's are encoded here
    group = _with_children(group, _raw_sequence(_item_bytes(items, shared)))
    measurements = _with_children(root.ContentSequence[-2], [group])
    sr["ContentSequence"] = _raw_sequence(_item_bytes([*head, *library, measurements, notes],
                                                      shared))
    for ds in (group, measurements, sr):  # written as encoded: pydicom keeps raw elements raw
        _as_encoded(ds)
    return sr


def _as_encoded(ds) -> None:
    """Mark ``ds`` and the items below it as being in the encoding they are written in
    (explicit VR little endian, their own character set): pydicom then writes raw elements as
    they are and skips its ambiguous-VR pass, which it would otherwise repeat at every level
    of a nested Content Sequence (an SR has no ambiguous VRs: no pixel, LUT or overlay
    data)."""
    ds.set_original_encoding(False, True, ds._character_set)
    for elem in ds.elements():
        if elem.VR == "SQ" and not getattr(elem, "is_raw", False):
            for item in elem.value:
                _as_encoded(item)


def _item_bytes(items, shared: dict) -> bytes:
    """The Content Sequence items ``items`` encoded as pydicom encodes them (explicit VR
    little endian, defined lengths); a template item's bytes come from ``shared`` (id ->
    bytes, made once per template)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_sequence_item

    out = []
    for item in items:
        data = shared.get(id(item))
        if data is None:
            _as_encoded(item)
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_sequence_item(fp, item, _ASCII)
            data = fp.getvalue()
        out.append(data)
    return b"".join(out)


def _raw_sequence(data: bytes):
    """A Content Sequence element whose items are already encoded (``data``): written as it
    is, with its defined length, as pydicom writes a sequence it encodes itself."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    return RawDataElement(Tag(0x0040A730), "SQ", len(data), data, 0, False, True)


#: the character set of the template's bytes: its text is ASCII (codes, UIDs, the statement,
#: parameters), which every single-byte set and UTF-8 encode alike
_ASCII = ["iso8859"]



def _template(header, info: ResultInfo):
    """(root, the root's items before the image library, the measurement group, the comment
    container, ``encoded``) of :func:`build_sr`'s content for ``info`` (its probability aside),
    built once per process and shared read-only (at most 16 kept). ``encoded(sr)``: the bytes
    of the template's own items (id -> bytes, made once) when ``sr`` is written as they were
    encoded (explicit VR little endian, a character set that writes ASCII as ASCII), else
    None."""
    from dataclasses import replace

    key = replace(info, probability=0.0)
    with _templates_lock:
        hit = _templates.get(key)
    if hit is not None:
        return hit
    root = _content(header, info)
    items = list(root.ContentSequence)
    codes_ = [_code(i) for i in items]
    cut = codes_.index(_LIBRARY) if _LIBRARY in codes_ else codes_.index(_MEASUREMENTS)
    if codes_[-2:] != [_MEASUREMENTS, _codes()["qualitative"].value]:
        raise RuntimeError(f"unexpected SR content order {codes_}")  # a bug here
    group = items[-2].ContentSequence[0]
    head, notes = items[:cut], items[-1]
    own = [*head, notes, *(i for i in group.ContentSequence if _code(i) not in _PER_IMAGE)]
    shared = {id(i): _item_bytes([i], {}) for i in own} if _is_ascii(own) else None
    hit = (root, head, group, notes, lambda sr: shared if _writes_alike(sr) else None)
    with _templates_lock:
        if len(_templates) >= 16:
            _templates.clear()
        _templates[key] = hit
    return hit


#: the group's items built anew for each image (see :func:`result_sr`)
_PER_IMAGE = (_TRACKING, _TRACKING_UID, _SOURCE, _PROBABILITY)


def _is_ascii(items) -> bool:
    """Whether every text in ``items`` (and below) is ASCII."""
    return all(str(e.value).isascii() for i in items for e in i.iterall()
               if e.VR in ("LO", "LT", "SH", "ST", "UT", "PN", "UC"))


def _writes_alike(sr) -> bool:
    """Whether ``sr`` is written in explicit VR little endian with a character set that
    encodes ASCII as ASCII (none, ISO_IR 6, 100-203, 192: not the ISO 2022 code extensions)."""
    from pydicom.uid import ExplicitVRLittleEndian

    meta = getattr(sr, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return False
    sets = sr.get("SpecificCharacterSet") or []
    sets = [sets] if isinstance(sets, str) else list(sets)
    return all(not str(c).startswith("ISO 2022") for c in sets)


def _sr_shell(header, info: ResultInfo, content):
    """highdicom's ComprehensiveSR for ``header`` over the root container ``content``."""
    import highdicom as hd
    from highdicom.sr import ComprehensiveSR

    return ComprehensiveSR(
        evidence=[header], content=content, series_instance_uid=_series_uid(header, info, "sr"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=_instance_number(header), manufacturer=MANUFACTURER, is_complete=True,
        series_description=SERIES_DESCRIPTION, software_versions=info.version)


def _with_children(item, children):
    """A new content item with ``item``'s attributes (shared, never changed) and
    ``children`` as its Content Sequence (a list of items, or :func:`_raw_sequence`)."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for elem in item:
        if elem.keyword != "ContentSequence":
            out.add(elem)
    if isinstance(children, list):
        out.ContentSequence = children
    else:
        out[children.tag] = children
    return out


def _code(item) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def _new_uid() -> str:
    import highdicom as hd

    return hd.UID()


def _library_ok(header) -> bool:
    """Whether highdicom can describe the image in the image library (TID 1600, optional):
    for projection radiographs it needs Patient Orientation and Imager Pixel Spacing."""
    if str(header.get("Modality", "")) not in ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"):
        return False
    spacing = header.get("ImagerPixelSpacing")
    return _orientation(header) is not None and spacing is not None and len(spacing) == 2


def build_sc(header, info: ResultInfo, heatmap_rgb: np.ndarray):
    """The RGB Secondary Capture (a highdicom dataset) of ``heatmap_rgb`` with the banner burned
    in, in the study of ``header``."""
    import highdicom as hd
    from highdicom.sc import SCImage
    from pydicom.dataset import Dataset

    pixels = burn_in(heatmap_rgb, info)
    orientation = _orientation(header)
    sc = SCImage.from_ref_dataset(
        header, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=_series_uid(header, info, "sc"),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=_instance_number(header), manufacturer=MANUFACTURER,
        patient_orientation=orientation or ("L", "F"), transfer_syntax_uid=_explicit(),
        series_description=SERIES_DESCRIPTION, software_versions=info.version)
    if orientation is None:  # unknown: Type 2, empty rather than guessed
        sc.PatientOrientation = None
    sc.BurnedInAnnotation = "YES"
    if header.get("BodyPartExamined"):
        sc.BodyPartExamined = header.BodyPartExamined
    if header.get("Laterality") or not header.get("BodyPartExamined"):
        sc.Laterality = header.get("Laterality") or None  # Type 2C: empty when unknown
    ref = Dataset()
    ref.ReferencedSOPClassUID = header.SOPClassUID
    ref.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.DerivationDescription = (f"pneumo-edge heatmap of P({info.positive_class}); "
                                "NOT FOR DIAGNOSTIC USE")[:1024]
    return sc


def _explicit():
    from pydicom.uid import ExplicitVRLittleEndian

    return ExplicitVRLittleEndian


def _orientation(header) -> tuple[str, str] | None:
    value = header.get("PatientOrientation")
    try:
        parts = [str(v) for v in value] if value is not None else []
    except TypeError:
        return None
    ok = len(parts) == 2 and all(re.fullmatch(r"[AFHLPR]{1,3}", p) for p in parts)
    return (parts[0], parts[1]) if ok else None


def _series_uid(header, info: ResultInfo, kind: str) -> str:
    """One series per study, model and kind: the same UID every time (restarts, reruns)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["pneumo-edge", kind, str(header.StudyInstanceUID),
                                      info.model_sha256])


def _instance_number(header) -> int:
    try:
        return max(1, int(str(header.get("InstanceNumber", "") or "1")))
    except ValueError:
        return 1


def burn_in(rgb: np.ndarray, info: ResultInfo) -> np.ndarray:
    """``rgb`` (uint8 ``[H, W, 3]``) with a banner above it: "NOT FOR DIAGNOSTIC USE" and the
    probability, label and threshold."""
    from PIL import Image, ImageDraw

    from pneumo_edge.explain.overlay import font

    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"heatmap_rgb must be uint8 [H, W, 3], not {rgb.dtype} {rgb.shape}")
    lines = [BANNER, (f"P({info.positive_class}) = {info.rounded:.{PROB_DIGITS}f}   "
                      f"label {info.label}   threshold {info.threshold:g} "
                      f"({info.threshold_source})")]
    line_h, width = 20, max(rgb.shape[1], 480)
    im = Image.new("RGB", (width, rgb.shape[0] + line_h * len(lines) + 8), "black")
    im.paste(Image.fromarray(rgb), (0, line_h * len(lines) + 8))
    d = ImageDraw.Draw(im)
    for i, text in enumerate(lines):
        d.text((4, 4 + i * line_h), text, fill=(255, 60, 60) if i == 0 else "white",
               font=font(14))
    return np.asarray(im)


def heatmap_picture(explainer, image: np.ndarray, threshold: float | None = None,
                    expl=None) -> np.ndarray:
    """The heatmap overlay (uint8 RGB) of one uint8 ``image [1, S, S]`` explained by
    ``explainer`` (:class:`pneumo_edge.explain.methods.Explainer`): what
    :func:`write_result_objects` takes. Its caption names the method only: no file name (names
    can carry patient data) and no label or probability, which the banner burns in from the
    SR's own numbers (the runtime's raw probability can differ from the reported one, e.g.
    after ``--prevalence``). ``threshold`` is not used (kept for callers); ``expl``: the
    explanation of ``image`` when already computed."""
    from pneumo_edge.explain.methods import caption
    from pneumo_edge.explain.overlay import render

    expl = expl if expl is not None else explainer(image)
    lines = caption("", expl, explainer.card, explainer.card.threshold, "")[2:]  # the method
    return np.asarray(render(image[0], expl.heat, expl.legend, lines))


# --- reading back ----------------------------------------------------------------------------

def read_result(sr_path) -> dict:
    """What an SR written here records: ``probability``, ``threshold``, ``present``,
    ``parameters`` (the algorithm parameters), ``source_sop_uid``, ``study_uid``."""
    import pydicom

    ds = pydicom.dcmread(sr_path)
    out: dict = {"study_uid": str(ds.StudyInstanceUID), "parameters": []}
    for item in _walk(ds.ContentSequence):
        code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item \
            else ""
        if item.ValueType == "NUM" and code in ("122157", "122411"):
            m = item.MeasuredValueSequence[0]  # the exact double when there, else the text
            value = float(m.get("FloatingPointValue", m.NumericValue))
            out["probability" if code == "122157" else "threshold"] = value
        elif item.ValueType == "CODE" and code == "233604007":
            out["present"] = item.ConceptCodeSequence[0].CodeValue == "52101004"
        elif item.ValueType == "TEXT" and code == "111002":
            out["parameters"].append(str(item.TextValue))
        elif item.ValueType == "IMAGE" and "source_sop_uid" not in out:
            out["source_sop_uid"] = str(
                item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return out


def _walk(seq):
    for item in seq:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def quiet() -> None:
    """highdicom's and pydicom's warnings and log lines off (they may quote values),
    process-wide. The warnings filter list is global and not thread-safe: this runs at import
    and again in the main thread of ``score --dicom-out`` and the node before their threads
    start (:class:`DicomOutSink`, :class:`pneumo_edge.dicomnode.worker.Worker`), never from
    the building of an object; idempotent. It imports highdicom's builders too: their imports
    (requests, urllib3) add warnings filters of their own."""
    import logging
    import warnings

    import highdicom.sc  # imported here, see above
    import highdicom.sr  # noqa: F401

    from pneumo_edge.inputs import dicom

    dicom.quiet()
    logger = logging.getLogger("highdicom")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    logger.propagate = False
    warnings.filterwarnings("ignore", module=r"highdicom(\.|$)")  # to the front, no duplicate


quiet()


# --- score --dicom-out -------------------------------------------------------------------------

def check_out_dir(out_dir) -> Path:
    """Refuse, before any work, a ``--dicom-out`` that is not a folder or whose parent is
    missing (:class:`~pneumo_edge.errors.UsageError`, exit 2)."""
    from pneumo_edge.errors import UsageError

    out = Path(out_dir)
    if os.path.islink(out) or (out.exists() and not out.is_dir()):
        raise UsageError(f"{out}: is a symbolic link or not a folder (--dicom-out names a "
                         "folder)")
    if not out.exists() and not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such folder for --dicom-out")
    return out


class DicomOutSink:
    """``score --dicom-out DIR``: wraps the scoring CSV's sink. For each row of a DICOM input
    that got a label, the SR (and with ``explain_which``, for the rows it selects, the heatmap
    SC: occlusion through the scoring runtime) is written before the row reaches the CSV, and
    the row's :data:`SR_COLUMN` (before ``error``) names it; error rows and other inputs get
    nothing and an empty column. ``files``: the inputs of the rows still to come, in order."""

    def __init__(self, sink, out_dir, files, runtime, threshold: float, source: str,
                 explain_which: str | None = None, log=None, head=(),
                 prevalence: float | None = None, explained=None):
        """``source``: :func:`threshold_source`; ``head``: the CSV header (its ``qc``
        column, when there, goes into the SR); ``prevalence``: the run's ``--prevalence``;
        ``explained``: the run's :class:`pneumo_edge.commands.explain.BatchExplainer`
        (``--explain``), whose explainer makes the heatmaps and which is handed each one
        (so its pictures do not compute them again)."""
        quiet()  # here, before the run's decode threads start
        self.inner, self.files, self.next = sink, files, 0
        self.out, self.rt, self.threshold = check_out_dir(out_dir), runtime, float(threshold)
        self.source, self.prevalence = source, prevalence
        self.head = list(head)
        self.which, self.explained = explain_which, explained
        self.explainer = explained.sink.explainer if explained is not None else None
        self.log = log or (lambda m: None)
        self.written = self.kept = self.heatmaps = self.refused = 0

    @property
    def partial(self):
        return self.inner.partial

    def write(self, rows) -> None:
        out = []
        for row in rows:
            path = self.files[self.next]
            self.next += 1
            out.append([*row[:-1], self._objects(path, row), row[-1]])
        self.inner.write(out)

    def _objects(self, path: str, row: list) -> str:
        from pneumo_edge.inputs.images import input_kind

        if not row[1] or input_kind(path) != "dicom":
            return ""
        info = ResultInfo.from_row(self.rt, row, self.head, self.threshold, self.source,
                                   prevalence=self.prevalence)
        try:
            sr = object_paths(self.out, _sop_uid(path), info.model_sha256)[0]
            if is_current(sr, info):
                self.kept += 1
                return str(sr)
            rgb = self._heatmap(path, row[1])
            paths = write_result_objects(path, info, self.out, rgb)
        except DicomOutError as exc:
            self.refused += 1
            self.log(f"{path}: no DICOM result objects: {exc}")
            return ""
        self.written += 1
        self.heatmaps += rgb is not None
        return str(paths[0])

    def _heatmap(self, path: str, label: str) -> np.ndarray | None:
        if self.which is None or (self.which == "positives"
                                  and label != self.rt.card.positive_class):
            return None
        from pneumo_edge.errors import ModelError
        from pneumo_edge.explain.methods import Explainer
        from pneumo_edge.inputs.images import ImageError, load_image

        self.explainer = self.explainer or Explainer(self.rt, "occlusion")
        try:
            image = load_image(path, self.rt.card.image_size)
            expl = self.explainer(image)
            if self.explained is not None:
                self.explained.give(path, image, expl)
            return heatmap_picture(self.explainer, image, self.threshold, expl)
        except ModelError:  # the runtime itself failed: the run stops (exit 2)
            raise
        except (ImageError, PneumoError) as exc:  # changed since scored, non-finite map: the
            self.log(f"{path}: no heatmap SC: {exc}")  # SR still records the score
            return None

    def finish(self) -> None:
        self.inner.finish()
        self.log(f"--dicom-out {self.out}: {self.written} SR(s) written"
                 + (f" ({self.heatmaps} with a heatmap SC)" if self.which else "")
                 + (f", {self.kept} already there" if self.kept else "")
                 + (f", {self.refused} DICOM inputs without result objects" if self.refused
                    else ""))

    def close(self) -> None:
        self.inner.close()


def _sop_uid(path) -> str:
    from pneumo_edge.inputs.dicom import identity

    return identity(path).uids[2]
