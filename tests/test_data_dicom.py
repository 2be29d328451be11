"""``angioexp synth --dicom`` → ``angioexp import-dicom``: the header's geometry against the
generator's truth, bit-exact pixels, de-identification, and files that cannot be imported."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest

from angioexp.cli import main
from angioexp.data.importers.dicom import SkippedFile, _hash, import_dicom, peak_contrast_frame, read_xa
from angioexp.data.index import read_index
from angioexp.data.synthetic import generate
from angioexp.data.synthetic.dicom import synthetic_identity, write_dicom_study
from angioexp.errors import InputError

SALT = "test-salt"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A synthetic study with its cines also as DICOM XA files (12 cines, some uint16)."""
    study = tmp_path_factory.mktemp("dicom") / "study"
    generate(study, cases=12, seed=3, size=128, frames=8, workers=1)
    write_dicom_study(study)
    return study


def _annotated_masks(study: Path, folder: Path) -> Path:
    """The generator's masks named <case>_frame<N>.npy: import-dicom takes N as the annotated frame."""
    folder.mkdir()
    for row in _rows(study / "index.csv"):
        shutil.copy(study / row["mask_path"], folder / f"{row['case_id']}_frame{row['frame_index']}.npy")
    return folder


def _imported_id(dicom_file: Path) -> str:
    return _hash(SALT.encode(), "c", str(pydicom.dcmread(dicom_file, stop_before_pixels=True).SOPInstanceUID))


def test_synth_dicom_cli_writes_one_xa_file_per_case(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "s"), "--cases", "3", "--size", "128", "--frames", "2",
                 "--workers", "1", "--dicom"]) == 0
    files = sorted((tmp_path / "s" / "dicom").glob("*.dcm"))
    assert [f.stem for f in files] == sorted(r["case_id"] for r in _rows(tmp_path / "s" / "index.csv"))
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "XA" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.12.1" and int(ds.NumberOfFrames) == 2


def test_import_matches_the_generators_truth(synth, tmp_path):
    masks = _annotated_masks(synth, tmp_path / "masks")
    out = import_dicom(synth / "dicom", tmp_path / "imported", masks=masks, salt=SALT)
    read_index(out / "index.csv")  # a valid study: convert can read it
    imported = {r["case_id"]: r for r in _rows(out / "index.csv")}
    truth = _rows(synth / "index.csv")
    manifest = json.loads((synth / "manifest.json").read_text())
    details = {d["case_id"]: d for d in manifest["cases"]}
    assert len(imported) == len(truth) == 12
    patients: dict[str, str] = {}
    for row in truth:
        got = imported[_imported_id(synth / "dicom" / f"{row['case_id']}.dcm")]
        assert float(got["primary_angle"]) == pytest.approx(float(row["primary_angle"]), abs=1e-9)
        assert float(got["secondary_angle"]) == pytest.approx(float(row["secondary_angle"]), abs=1e-9)
        assert float(got["pixel_spacing_mm"]) == pytest.approx(float(row["pixel_spacing_mm"]), abs=1e-6)
        # and from the physics: detector pitch (fov / size) over the magnification SID / SOD
        detail = details[row["case_id"]]
        physical = detail["fov_mm"] / 128 / (detail["sid_mm"] / 750.0)
        assert float(got["pixel_spacing_mm"]) == pytest.approx(physical, rel=2e-3)
        assert int(got["frame_index"]) == int(row["frame_index"])
        cine, source = np.load(out / got["cine_path"]), np.load(synth / row["cine_path"])
        assert cine.dtype == source.dtype and cine.shape == source.shape == (8, 128, 128)
        assert np.array_equal(cine, source)
        assert np.array_equal(np.load(out / got["mask_path"]), np.load(synth / row["mask_path"]))
        patients.setdefault(row["patient_id"], got["patient_id"])
        assert patients[row["patient_id"]] == got["patient_id"], "one synthetic patient → one imported patient"
    assert len(set(patients.values())) == len(patients), "different patients stay different"
    assert {"uint8", "uint16"} == {np.load(out / r["cine_path"]).dtype.name for r in imported.values()}
    cases = json.loads((out / "manifest.json").read_text())["cases"]
    assert {c["frame_chosen_by"] for c in cases} == {"annotated (label file name)"}
    assert all("SOD/SID" in c["pixel_spacing_from"] for c in cases)


def test_same_salt_same_ids_and_no_masks_gives_cines_csv_with_peak_contrast_frames(synth, tmp_path):
    a = import_dicom(synth / "dicom", tmp_path / "a", salt=SALT)
    b = import_dicom(synth / "dicom", tmp_path / "b", salt=SALT)
    assert not (a / "index.csv").exists(), "no masks: nothing for convert"
    rows_a, rows_b = _rows(a / "cines.csv"), _rows(b / "cines.csv")
    assert [r["case_id"] for r in rows_a] == [r["case_id"] for r in rows_b]
    other = import_dicom(synth / "dicom", tmp_path / "c", salt="another")
    assert not {r["case_id"] for r in rows_a} & {r["case_id"] for r in _rows(other / "cines.csv")}
    # the peak-contrast frame against the generator's peak-opacification frame
    truth = {_imported_id(synth / "dicom" / f"{r['case_id']}.dcm"): int(r["frame_index"]) for r in _rows(synth / "index.csv")}
    off = [abs(int(r["frame_index"]) - truth[r["case_id"]]) for r in rows_a]
    assert max(off) <= 1 and sum(o == 0 for o in off) >= 0.75 * len(off), off
    cases = json.loads((a / "manifest.json").read_text())["cases"]
    assert {c["frame_chosen_by"] for c in cases} == {"peak contrast"}


def test_peak_contrast_frame_finds_the_opacified_frame():
    rng = np.random.default_rng(0)
    frames = (180 + rng.normal(0, 4, (5, 96, 96))).astype(np.float32)
    for t, depth in enumerate([0, 10, 40, 20, 5]):  # a dark vessel, darkest at frame 2
        frames[t, 20:80, 46:50] -= depth
    assert peak_contrast_frame(frames.clip(0, 255).astype(np.uint8)) == 2
    assert peak_contrast_frame(frames[:1].astype(np.uint8)) == 0


def _all_written_bytes(*folders: Path) -> bytes:
    return b"\n".join(p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file())


def test_nothing_identifying_reaches_the_study_coco_or_tracking_store(synth, tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    masks = _annotated_masks(synth, tmp_path / "masks")
    assert main(["import-dicom", "--root", str(synth / "dicom"), "--out", "imported", "--masks", str(masks),
                 "--salt", SALT]) == 0
    assert main(["convert", "--index", "imported/index.csv", "--out", "coco", "--stage", "1"]) == 0
    assert main(["register", "--coco", "coco"]) == 0
    seed = json.loads((synth / "manifest.json").read_text())["seed"]
    secrets_ = set()
    for row in _rows(synth / "index.csv"):
        identity = synthetic_identity(seed, row["patient_id"], row["case_id"])
        secrets_ |= set(identity.values()) - {"F", "M"}  # one-letter sex codes occur everywhere
        ds = pydicom.dcmread(synth / "dicom" / f"{row['case_id']}.dcm", stop_before_pixels=True)
        secrets_ |= {str(ds.PatientName), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
        secrets_.add(row["case_id"])  # the source file's name
    written = _all_written_bytes(tmp_path / "imported", tmp_path / "coco", tmp_path / "mlartifacts")
    written += (tmp_path / "mlflow.db").read_bytes()
    assert len(written) > 100_000
    leaked = sorted(s for s in secrets_ if s.encode() in written)
    assert not leaked, f"identifying values written: {leaked[:5]}"
    # the check can see a leak: the salt-less hash inputs are not there, the hashed ids are
    assert _imported_id(next((synth / "dicom").glob("*.dcm"))).encode() in written


def test_one_frame_multiframe_file_imports(synth, tmp_path):
    from angioexp.data.synthetic.dicom import write_xa

    root = tmp_path / "root"
    root.mkdir()
    ds = pydicom.dcmread(next((synth / "dicom").glob("*.dcm")))
    frames = ds.pixel_array[:1]
    write_xa(root / "one.dcm", frames, primary=-30.0, secondary=20.0, imager_pixel_mm=0.3, sid_mm=1000.0, sod_mm=750.0,
             frame_time_ms=66.7, identity={"PatientID": "X1"}, uids={"study": "1.2.3", "series": "1.2.3.4", "sop": "1.2.3.4.5"})
    assert int(pydicom.dcmread(root / "one.dcm").NumberOfFrames) == 1
    out = import_dicom(root, tmp_path / "out", salt=SALT)
    (row,) = _rows(out / "cines.csv")
    assert row["frame_index"] == "0" and float(row["primary_angle"]) == -30.0 and float(row["secondary_angle"]) == 20.0
    assert float(row["pixel_spacing_mm"]) == pytest.approx(0.3 * 750 / 1000)
    assert np.array_equal(np.load(out / row["cine_path"]), frames)
    assert json.loads((out / "manifest.json").read_text())["cases"][0]["frame_chosen_by"] == "only frame"


def _copy_one(synth: Path, root: Path) -> Path:
    root.mkdir(exist_ok=True)
    source = next(p for p in sorted((synth / "dicom").glob("*.dcm")) if pydicom.dcmread(p).BitsAllocated == 8)
    return Path(shutil.copy(source, root / "good.dcm"))


def test_a_dicom_that_is_not_xa_is_skipped_and_named(synth, tmp_path, capsys):
    ct = _bundled("CT_small.dcm")
    root = tmp_path / "root"
    _copy_one(synth, root)
    shutil.copy(ct, root / "ct.dcm")
    (root / "notes.txt").write_text("not dicom")
    out = import_dicom(root, tmp_path / "out", salt=SALT)
    err = capsys.readouterr().err
    assert "skipped ct.dcm: not X-ray angiography: modality CT, SOP class CT Image Storage" in err
    assert "skipped notes.txt: not a DICOM file" in err
    assert len(_rows(out / "cines.csv")) == 1
    assert json.loads((out / "manifest.json").read_text())["skipped"] == 2
    with pytest.raises(InputError, match=r"ct.dcm: not X-ray angiography.*refused: --strict"):
        import_dicom(root, tmp_path / "strict", salt=SALT, strict=True)
    assert not (tmp_path / "strict").exists()


def test_truncated_files_are_skipped_with_the_reason(synth, tmp_path, capsys):
    root = tmp_path / "root"
    good = _copy_one(synth, root)
    data = good.read_bytes()
    (root / "half.dcm").write_bytes(data[: len(data) // 2])  # pixel data cut
    (root / "head.dcm").write_bytes(data[:300])  # header cut
    with pytest.raises(SkippedFile, match="unreadable pixel data"):
        read_xa(root / "half.dcm")
    with pytest.raises(SkippedFile, match="truncated|unreadable"):
        read_xa(root / "head.dcm")
    import_dicom(root, tmp_path / "out", salt=SALT)
    err = capsys.readouterr().err
    assert "skipped half.dcm" in err and "skipped head.dcm" in err


def test_unsupported_compression_names_the_transfer_syntax(synth, tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    good = _copy_one(synth, tmp_path / "root")
    ds = pydicom.dcmread(good)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)] * int(ds.NumberOfFrames))  # not a decodable codestream
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(good, enforce_file_format=True)
    with pytest.raises(SkippedFile) as info:
        read_xa(good)
    message = str(info.value)
    assert "JPEG 2000 Image Compression (Lossless Only) (1.2.840.10008.1.2.4.90)" in message
    assert "pip install" in message
    with pytest.raises(InputError, match=r"no importable XA cine among 1 file"):
        import_dicom(tmp_path / "root", tmp_path / "out", salt=SALT)
    assert main(["import-dicom", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "o"), "--strict"]) == 2


def test_rle_lossless_decodes_without_plugins_bit_exact(synth, tmp_path):
    """An odd but common encoding pydicom decodes on its own: RLE Lossless."""
    from pydicom.uid import RLELossless

    good = _copy_one(synth, tmp_path / "root")
    ds = pydicom.dcmread(good)
    original = ds.pixel_array.copy()
    ds.compress(RLELossless)
    ds.save_as(good, enforce_file_format=True)
    cine = read_xa(good)
    assert "RLE Lossless" in cine.transfer_syntax and np.array_equal(cine.frames, original)


def _bundled(name: str) -> Path:
    """One of the test files inside the pydicom wheel (get_testdata_file would try the network)."""
    return Path(pydicom.data.__file__).parent / "test_files" / name


def _as_xa(name: str, folder: Path) -> Path:
    """A pydicom test file relabelled as XA, encoding kept: the importer's decoding path on it."""
    ds = pydicom.dcmread(_bundled(name))
    ds.Modality = "XA"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"
    folder.mkdir(exist_ok=True)
    ds.save_as(folder / name)
    return folder / name


def test_pydicoms_own_odd_encodings_decode_to_the_same_pixels(tmp_path):

    reference = read_xa(_as_xa("MR_small.dcm", tmp_path)).frames
    assert reference.shape == (1, 64, 64) and reference.dtype == np.uint16
    for name in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        frames = read_xa(_as_xa(name, tmp_path)).frames
        assert np.array_equal(frames, reference), name
    deflated = read_xa(_as_xa("image_dfl.dcm", tmp_path))
    assert "Deflated" in deflated.transfer_syntax and deflated.frames.dtype == np.uint8
    multi = read_xa(_as_xa("SC_rgb_rle_2frame.dcm", tmp_path)).frames  # colour RLE, 2 frames → luminance
    assert multi.shape[0] == 2 and multi.dtype == np.uint8
    wide = read_xa(_as_xa("SC_rgb_rle_16bit.dcm", tmp_path)).frames  # 16-bit colour keeps 16 bits
    assert wide.dtype == np.uint16 and wide.max() > 255
    palette_file = _as_xa("examples_palette.dcm", tmp_path)
    palette = read_xa(palette_file).frames  # the colours of the indices, not the indices
    indices = pydicom.dcmread(palette_file).pixel_array
    assert palette.shape == (1, *indices.shape) and not np.array_equal(palette[0], indices)
    with pytest.raises(SkippedFile, match="unreadable pixel data"):
        read_xa(_as_xa("MR_truncated.dcm", tmp_path))
    try:  # JPEG-LS decodes only through a plugin (pylibjpeg-libjpeg or gdcm)
        read_xa(_as_xa("MR_small_jpeg_ls_lossless.dcm", tmp_path))
    except SkippedFile as exc:
        assert "transfer syntax JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in str(exc)
    with pytest.raises(SkippedFile, match="not X-ray angiography: modality RTDOSE"):
        read_xa(_bundled("rtdose_rle.dcm"))


def test_bad_roots_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        import_dicom(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "root").mkdir()
    with pytest.raises(InputError, match="lies inside the input"):
        import_dicom(tmp_path / "root", tmp_path / "root" / "out")
    with pytest.raises(InputError, match="no importable XA cine among 0"):
        import_dicom(tmp_path / "root", tmp_path / "out")


def test_labels_match_by_relative_path_and_a_shared_bare_stem_is_refused(synth, tmp_path):
    source = _copy_one(synth, tmp_path / "src")
    root = tmp_path / "root"
    for sub in ("a", "b"):  # two runs with the same file name in different folders
        (root / sub).mkdir(parents=True)
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.{ord(sub)}"
        ds.save_as(root / sub / "IMG1.dcm", enforce_file_format=True)
    mask = np.zeros((128, 128), np.uint8)
    mask[60:64, 10:100] = 1
    mirrored = tmp_path / "mirrored"
    for sub, frame in (("a", 1), ("b", 2)):
        (mirrored / sub).mkdir(parents=True)
        np.save(mirrored / sub / f"IMG1_frame{frame}.npy", mask)
    out = import_dicom(root, tmp_path / "out", masks=mirrored, salt=SALT)
    assert sorted(int(r["frame_index"]) for r in _rows(out / "index.csv")) == [1, 2]
    flat = tmp_path / "flat"
    flat.mkdir()
    np.save(flat / "IMG1.npy", mask)
    with pytest.raises(InputError, match=r"label IMG1.npy matches both a/IMG1.dcm and b/IMG1.dcm"):
        import_dicom(root, tmp_path / "out2", masks=flat, salt=SALT)
    assert not (tmp_path / "out2").exists()
