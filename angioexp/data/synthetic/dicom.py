"""``angioexp synth --dicom``: each synthetic cine also as a DICOM XA multi-frame file.

``dicom/<case_id>.dcm`` (X-Ray Angiographic Image Storage, explicit VR little endian) carries
the generator's truth in the header, so that ``angioexp import-dicom`` can be tested end to end
against known answers:

* PositionerPrimaryAngle / PositionerSecondaryAngle = index.csv's angles;
* DistanceSourceToDetector = the case's SID, DistanceSourceToPatient = the source–isocentre
  distance (SOD), and ImagerPixelSpacing = the detector pitch that, divided by the
  magnification SID / SOD, gives index.csv's ``pixel_spacing_mm`` exactly;
* the pixels are the cine's, bit for bit (uint8 → 8 bits; 12-bit uint16 → BitsStored 12);
* FrameTime from the generator's frame rate.

Each synthetic patient also gets an invented identity — name, ID, birth date, sex, accession
number, institution, referring physician, dates, UIDs — that looks like a real one, so that
de-identification can be tested by searching every file an import writes for these values.
Everything is derived from the seed and the case id: the same study gives the same files.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from angioexp.errors import InputError
from angioexp.fileio import atomic_dir

XA_STORAGE = "1.2.840.10008.5.1.4.1.1.12.1"
_GIVEN = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Claude")
_FAMILY = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Shannon")


def synthetic_identity(seed: int, patient_id: str, case_id: str) -> dict[str, str]:
    """The invented identifying header values of one synthetic case (see the module docstring)."""
    digest = int.from_bytes(hashlib.sha256(f"{seed}|{patient_id}".encode()).digest()[:8], "big")
    case_digest = int.from_bytes(hashlib.sha256(f"{seed}|{case_id}".encode()).digest()[:8], "big")
    year, month, day = 1930 + digest % 60, 1 + (digest >> 8) % 12, 1 + (digest >> 16) % 28
    return {
        "PatientName": f"{_FAMILY[digest % 8]}{digest % 977}^{_GIVEN[(digest >> 4) % 8]}",
        "PatientID": f"MRN{digest % 10**9:09d}",
        "PatientBirthDate": f"{year:04d}{month:02d}{day:02d}",
        "PatientSex": "FM"[(digest >> 24) % 2],
        "AccessionNumber": f"ACC{case_digest % 10**10:010d}",
        "InstitutionName": f"St Synthetica Heart Centre {digest % 89}",
        "ReferringPhysicianName": f"Referrer{digest % 613}^Rita",
        "StudyDate": f"20{10 + digest % 15:02d}{month:02d}{day:02d}",
        "StudyID": f"S{digest % 10**6:06d}",
    }


def _uid(seed: int, *parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(seed), *parts])


def _ds(value: float) -> str:
    """A DICOM decimal string (≤ 16 characters) as close to ``value`` as that allows."""
    for digits in range(12, 5, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.6g}"


def write_xa(path: Path, frames: np.ndarray, *, primary: float, secondary: float, imager_pixel_mm: float,
             sid_mm: float, sod_mm: float, frame_time_ms: float, identity: dict[str, str], uids: dict[str, str]) -> None:
    """One T×H×W uint8/uint16 cine → an XA multi-frame DICOM file at ``path``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    if frames.ndim != 3 or frames.dtype not in (np.uint8, np.uint16):
        raise InputError(f"expected a T×H×W uint8/uint16 cine, got {frames.dtype} {frames.shape}", file=path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XA_STORAGE
    meta.MediaStorageSOPInstanceUID = uids["sop"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = XA_STORAGE
    ds.SOPInstanceUID = uids["sop"]
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.Modality = "XA"
    ds.Manufacturer = "angioexp synthetic"
    for keyword, value in identity.items():
        setattr(ds, keyword, value)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    bits = 8 if frames.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = 8 if bits == 8 else 12  # the generator's uint16 cines are 12-bit (0–4095)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.FrameTime = _ds(frame_time_ms)
    ds.FrameIncrementPointer = 0x00181063  # FrameTime
    ds.PositionerPrimaryAngle = _ds(primary)
    ds.PositionerSecondaryAngle = _ds(secondary)
    ds.ImagerPixelSpacing = [_ds(imager_pixel_mm), _ds(imager_pixel_mm)]
    ds.DistanceSourceToDetector = _ds(sid_mm)
    ds.DistanceSourceToPatient = _ds(sod_mm)
    ds.PixelData = np.ascontiguousarray(frames).astype(frames.dtype.newbyteorder("<"), copy=False).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_dicom_study(study: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``dicom/<case_id>.dcm`` for every case of a synthetic study; returns that folder."""
    study = Path(study)
    manifest = json.loads((study / "manifest.json").read_text(encoding="utf-8"))
    details = {d["case_id"]: d for d in manifest["cases"]}
    geometry = manifest["geometry"]
    seed = int(manifest["seed"])
    sod = float(geometry["source_isocentre_mm"])
    frame_time_ms = 1000.0 / float(geometry["cine_fps"])
    with open(study / "index.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    with atomic_dir(study / "dicom", overwrite=overwrite) as tmp:
        for row in rows:
            case_id, patient_id = row["case_id"], row["patient_id"]
            sid = float(details[case_id]["sid_mm"])
            frames = np.load(study / row["cine_path"], allow_pickle=False)
            write_xa(
                tmp / f"{case_id}.dcm", frames,
                primary=float(row["primary_angle"]), secondary=float(row["secondary_angle"]),
                # the detector pitch whose isocentre projection is index.csv's spacing
                imager_pixel_mm=float(row["pixel_spacing_mm"]) * sid / sod,
                sid_mm=sid, sod_mm=sod, frame_time_ms=frame_time_ms,
                identity=synthetic_identity(seed, patient_id, case_id),
                uids={"study": _uid(seed, patient_id, "study"), "series": _uid(seed, case_id, "series"),
                      "sop": _uid(seed, case_id, "sop")},
            )
    return study / "dicom"
