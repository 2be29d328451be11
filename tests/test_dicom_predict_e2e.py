"""From a clean study to predictions on a DICOM file, through the commands a researcher types:
``synth --dicom`` → ``import-dicom`` → ``prepare`` → ``train`` (tracked, registered) →
``predict --model models:/angio-stage1@champion`` — and no identifying header value anywhere in
what they wrote, the tracking store included."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pydicom
import pytest

from angioexp.cli import main
from angioexp.data.synthetic.dicom import synthetic_identity

pytestmark = pytest.mark.slow  # ~40–60 s on 2 CPU cores

TINY = ["--set", "scratch.resolution=64", "--set", "scratch.train_batch_size=2", "--set", "scratch.val_batch_size=4",
        "--set", "train.max_steps=3", "--set", "train.eval_every=3", "--set", "train.log_every=1",
        "--set", "eval.overlays=0", "--set", "train.device=cpu"]


def test_synth_dicom_import_prepare_train_predict(tmp_path, mlflow_uri, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    assert main(["synth", "--out", "synth", "--cases", "6", "--size", "128", "--frames", "4", "--workers", "1", "--dicom"]) == 0
    with open("synth/index.csv", newline="", encoding="utf-8") as handle:
        truth = list(csv.DictReader(handle))
    (tmp_path / "labels").mkdir()
    for row in truth:  # the generator's labels, named for their annotated frame
        shutil.copy(f"synth/{row['mask_path']}", f"labels/{row['case_id']}_frame{row['frame_index']}.npy")

    assert main(["import-dicom", "--root", "synth/dicom", "--out", "study", "--masks", "labels", "--salt", "s3cret"]) == 0
    assert main(["prepare", "--index", "study/index.csv", "--stage", "1", "--cache-dir", "cache", "--register"]) == 0
    coco = next(p.parent for p in (tmp_path / "cache").rglob("manifest.json") if (p.parent / "train").is_dir())
    assert main(["train", "--stage", "1", "--coco-dir", str(coco), "--out", "run", "--init-from", "none", *TINY]) == 0

    dicom_file = sorted((tmp_path / "synth" / "dicom").glob("*.dcm"))[0]
    capsys.readouterr()
    assert main(["predict", "--model", "models:/angio-stage1@champion", "--input", str(dicom_file), "--out", "pred",
                 "--threshold", "0"]) == 0
    assert "predicted 4 frame(s) of 1 input(s)" in capsys.readouterr().out
    folder = tmp_path / "pred" / dicom_file.stem
    assert len(list((folder / "overlays").glob("frame_*.png"))) == 4
    assert len(list((folder / "labels").glob("frame_*.npy"))) == 4
    assert [p for p in folder.iterdir() if p.is_file() and p.name.startswith("overlay")]  # the cine's video
    with open(tmp_path / "pred" / "segments.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert table and all(float(r["centreline_mm"]) > 0 for r in table)
    summary = json.loads((tmp_path / "pred" / "predict.json").read_text())
    assert summary["model"]["model_name"] == "angio-stage1" and summary["model"]["version"] == "1"

    # de-identification across everything written, the tracking store included
    seed = json.loads((tmp_path / "synth" / "manifest.json").read_text())["seed"]
    identifying = set()
    for row in truth:
        identifying |= set(synthetic_identity(seed, row["patient_id"], row["case_id"]).values()) - {"F", "M"}
        ds = pydicom.dcmread(tmp_path / "synth" / "dicom" / f"{row['case_id']}.dcm", stop_before_pixels=True)
        identifying |= {ds.StudyInstanceUID, ds.SOPInstanceUID}
    written = b"".join(p.read_bytes() for top in ("study", "cache", "run", "pred", "mlartifacts", "mlflow.db")
                       for p in ([tmp_path / top] if (tmp_path / top).is_file() else (tmp_path / top).rglob("*"))
                       if p.is_file())
    assert len(written) > 1_000_000
    assert not sorted(s for s in identifying if s.encode() in written)
    imported = np.load(next((tmp_path / "study" / "cines").glob("*.npy")))
    assert imported.shape == (4, 128, 128)
