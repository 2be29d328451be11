"""Dataset digest (stable / sensitive) and registration in a real temporary MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from angioexp.data.convert import convert, encode_png_gray8
from angioexp.data.register import dataset_digest, dataset_profile, log_coco_inputs, register, split_manifest
from tests.helpers.study import write_study


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return write_study(tmp_path_factory.mktemp("study"), cases=8, size=48, frames=2)


@pytest.fixture(scope="module")
def coco(study, tmp_path_factory) -> Path:
    return convert(study, tmp_path_factory.mktemp("coco") / "coco", stage=1, workers=1)


def test_digest_is_stable_across_reconversion(study, coco, tmp_path):
    again = convert(study, tmp_path / "again", stage=1, workers=2)
    assert dataset_digest(again) == dataset_digest(coco) == json.loads((coco / "manifest.json").read_text())["dataset_digest"]
    assert len(dataset_digest(coco)) == 12
    stage2 = convert(study, tmp_path / "stage2", stage=2, workers=1)
    assert dataset_digest(stage2) != dataset_digest(coco)


def test_one_pixel_changes_the_digest(coco, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(coco, copy)
    before = dataset_digest(copy)
    png = sorted((copy / "val" / "images").glob("*.png"))[0]
    pixels = np.asarray(Image.open(png)).copy()
    pixels[3, 4] ^= 1
    png.write_bytes(encode_png_gray8(pixels))
    after = dataset_digest(copy)
    assert after != before
    pixels[3, 4] ^= 1  # restoring the pixel restores the digest
    png.write_bytes(encode_png_gray8(pixels))
    assert dataset_digest(copy) == before


def test_annotation_and_image_entry_changes_change_the_digest(coco, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(coco, copy)
    before = dataset_digest(copy)
    for file_name in ("annotations.json", "annotations_gt.json"):
        path = copy / "train" / file_name
        original = path.read_text()
        data = json.loads(original)
        data["annotations"][0]["area"] += 1
        path.write_text(json.dumps(data))
        assert dataset_digest(copy) != before
        path.write_text(original)
    path = copy / "train" / "annotations.json"
    data = json.loads(path.read_text())
    data["images"][0]["primary_angle"] = 12.5
    path.write_text(json.dumps(data))
    assert dataset_digest(copy) != before


def test_manifest_and_profile(coco):
    df, digest, categories = split_manifest(coco, "train")
    assert list(df["image_sha256"].str.len().unique()) == [64]
    assert (df["n_coronary_artery"] == 1).all() and (df["instances"] == 1).all()
    assert ((df["vessel_fraction"] > 0) & (df["vessel_fraction"] < 1)).all()
    profile = dataset_profile(coco)
    assert profile["digest"] == dataset_digest(coco) and profile["stage"] == 1
    train = profile["splits"]["train"]
    assert train["images"] == len(df) and train["digest"] == digest
    assert train["instances_per_category"] == {"coronary artery": len(df)}
    assert sum(train["images_per_view"].values()) == len(df)
    assert train["vessel_fraction"]["min"] <= train["vessel_fraction"]["mean"] <= train["vessel_fraction"]["max"]
    assert train["has_clean_labels"] is True


def test_register_logs_inputs_and_profile(coco, mlflow_uri, capsys):
    from mlflow import MlflowClient

    from angioexp.cli import main

    assert main(["register", "--coco", str(coco), "--experiment", "angioexp-datasets"]) == 0
    digest = dataset_digest(coco)
    assert digest in capsys.readouterr().out
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("angioexp-datasets")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == f"register-{digest}"
    assert run.data.tags["dataset.digest"] == digest
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {f"coco/{s}" for s in ("train", "val", "test")}
    contexts = {name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for name, i in inputs.items()}
    assert contexts == {"coco/train": "training", "coco/val": "validation", "coco/test": "testing"}
    assert inputs["coco/train"].dataset.digest == split_manifest(coco, "train")[1]
    schema = json.loads(inputs["coco/train"].dataset.schema)
    assert "image_sha256" in json.dumps(schema)
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "dataset")}
    assert {"dataset/profile.json", "dataset/manifest.json", "dataset/train_images.csv"} <= artifacts
    profile = json.loads(Path(client.download_artifacts(run.info.run_id, "dataset/profile.json")).read_text())
    assert profile["digest"] == digest
    assert run.data.metrics["train/images"] == profile["splits"]["train"]["images"]
    run_id, again = register(coco, experiment="angioexp-datasets")  # a re-run: same digest, new run
    assert again == digest and run_id != run.info.run_id


def test_log_coco_inputs_into_the_active_run(coco, mlflow_uri):
    import mlflow
    from mlflow import MlflowClient

    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_coco_inputs(coco)
    with mlflow.start_run() as run:
        digest = log_coco_inputs(coco, {"train": "training", "val": "validation"})
    assert digest == dataset_digest(coco)
    logged = MlflowClient(mlflow_uri).get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted({t.key: t.value for t in i.tags}["mlflow.data.context"] for i in logged) == ["training", "validation"]



def test_register_with_unreachable_server_fails_cleanly(coco, monkeypatch, capsys):
    from angioexp.cli import main

    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    try:
        assert main(["register", "--coco", str(coco)]) == 2
    finally:
        mlflow.set_tracking_uri(None)
    assert "unreachable" in capsys.readouterr().err
