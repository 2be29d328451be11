"""``angioexp predict``: inputs of every kind through the evaluation's own inference, outputs,
centreline lengths, and the refusals (missing model, an output folder that is an input)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from angioexp.cli import main
from angioexp.errors import InputError
from angioexp.predict import predict
from angioexp.predict.outputs import centreline_px
from angioexp.train.inference import predict_split
from tests.helpers.vessel_coco import make_vessel_coco

BASE = ["--set", "scratch.resolution=64", "--set", "scratch.train_batch_size=2", "--set", "eval.overlays=0",
        "--set", "train.eval_every=100", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """(a 2-step Stage 1 checkpoint, its COCO data)."""
    root = tmp_path_factory.mktemp("predict")
    coco = make_vessel_coco(root / "coco", stage=1, size=64, n_train=4, n_val=2)
    assert main(["train", "--stage", "1", "--no-tracking", "--coco-dir", str(coco), "--out", str(root / "run"),
                 "--max-steps", "2", *BASE]) == 0
    return root / "run" / "checkpoints" / "last.pt", coco


@pytest.fixture(scope="module")
def dicom_file(tmp_path_factory) -> Path:
    from angioexp.data.synthetic import generate
    from angioexp.data.synthetic.dicom import write_dicom_study

    study = tmp_path_factory.mktemp("dcm") / "study"
    generate(study, cases=3, seed=1, size=128, frames=3, workers=1)
    return next(iter(sorted(write_dicom_study(study).glob("*.dcm"))))


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_predict_a_dicom_cine_writes_label_maps_overlays_video_and_tables(checkpoint, dicom_file, tmp_path):
    import pydicom

    ckpt, _ = checkpoint
    summary = predict(str(ckpt), [dicom_file], tmp_path / "out", threshold=0.0)
    out = tmp_path / "out"
    name = dicom_file.stem
    assert summary["frames"] == 3 and summary["model"]["stage"] == 1
    for frame in range(3):
        labels = np.load(out / name / "labels" / f"frame_{frame:04d}.npy")
        assert labels.shape == (128, 128) and labels.dtype == np.uint8 and labels.any()
        with Image.open(out / name / "labels" / f"frame_{frame:04d}.png") as image:
            assert image.mode == "P" and np.array_equal(np.asarray(image), labels)
        with Image.open(out / name / "overlays" / f"frame_{frame:04d}.png") as image:
            assert image.size == (128, 128) and image.mode == "RGB"
    video = [p for p in (out / name).iterdir() if p.is_file() and p.name.startswith("overlay")]
    assert len(video) == 1
    if video[0].suffix == ".png":  # animated PNG fallback
        with Image.open(video[0]) as image:
            assert getattr(image, "n_frames", 1) == 3
    images = json.loads((out / "images.json").read_text())
    ds = pydicom.dcmread(dicom_file)
    spacing = float(ds.ImagerPixelSpacing[0]) * float(ds.DistanceSourceToPatient) / float(ds.DistanceSourceToDetector)
    assert images[0]["pixel_spacing_mm"] == pytest.approx(spacing)
    assert images[0]["primary_angle"] == pytest.approx(float(ds.PositionerPrimaryAngle))
    table = _rows(out / "segments.csv")
    assert {int(r["frame_index"]) for r in table} == {0, 1, 2}
    for row in table:
        assert float(row["centreline_mm"]) == pytest.approx(float(row["centreline_px"]) * spacing, rel=1e-3)
        assert int(row["area_px"]) > 0
    preds = json.loads((out / "predictions.json").read_text())
    assert {p["image_id"] for p in preds} <= {im["id"] for im in images}
    assert json.loads((out / "predict.json").read_text())["model"]["uri"] == str(ckpt)
    assert summary["arcade"] is None and "Stage 1" in summary["no_arcade"] and not (out / "arcade.json").exists()


def test_predict_goes_through_the_evaluations_inference_and_merge(checkpoint, tmp_path):
    """A COCO image given as a one-row cines.csv (with its view): the same results as
    predict_split on its split, and the label map is the union of the results above the threshold."""
    from angioexp.data.coco import CocoSplit

    ckpt, coco = checkpoint
    split = CocoSplit.load(coco, "val")
    record = split.images[0]
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "x.npy", split.image(record.id)[None])
    (tmp_path / "in" / "cines.csv").write_text("case_id,cine_path,frame_index,primary_angle,secondary_angle\n"
                                        f"x,x.npy,0,{record.primary_angle},{record.secondary_angle}\n")
    expected = predict_split(ckpt, coco, "val", image_ids=[record.id])
    threshold = float(np.median([p["score"] for p in expected]))  # keeps some results, not all
    predict(str(ckpt), [tmp_path / "in" / "cines.csv"], tmp_path / "out", threshold=threshold)
    got = json.loads((tmp_path / "out" / "predictions.json").read_text())
    key = lambda p: (round(p["score"], 6), p["segmentation"]["counts"])  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, expected))
    union = np.zeros((record.height, record.width), dtype=bool)
    for p in expected:
        if p["score"] >= threshold:
            union |= mask_utils.decode(p["segmentation"]).astype(bool)
    assert union.any()
    labels = np.load(tmp_path / "out" / "x" / "labels" / "frame_0000.npy")
    assert np.array_equal(labels == 1, union)


def test_npy_frames_and_csv_inputs(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    cine = (np.random.default_rng(0).integers(0, 4096, (4, 64, 64))).astype(np.uint16)
    study = tmp_path / "study"
    (study / "cines").mkdir(parents=True)
    np.save(study / "cines" / "a.npy", cine)
    (study / "cines.csv").write_text("case_id,cine_path,frame_index,pixel_spacing_mm\nc1,cines/a.npy,2,0.25\n")
    predict(str(ckpt), [study / "cines" / "a.npy"], tmp_path / "o1", frames="1,3")
    assert sorted(p.name for p in (tmp_path / "o1" / "a" / "labels").glob("*.npy")) == ["frame_0001.npy", "frame_0003.npy"]
    predict(str(ckpt), [study / "cines.csv"], tmp_path / "o2")
    assert [p.name for p in (tmp_path / "o2" / "c1" / "labels").glob("*.npy")] == ["frame_0002.npy"]
    assert json.loads((tmp_path / "o2" / "images.json").read_text())[0]["pixel_spacing_mm"] == 0.25
    with pytest.raises(InputError, match="--frames 7 is out of range: the cine has 4 frame"):
        predict(str(ckpt), [study / "cines" / "a.npy"], tmp_path / "o3", frames="7")
    assert not (tmp_path / "o3").exists()


def test_a_model_uri_that_does_not_exist_is_one_line(tmp_path, mlflow_uri, capsys):
    frame = tmp_path / "f.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(frame)
    code = main(["predict", "--model", "models:/angio-stage9@champion", "--input", str(frame), "--out", str(tmp_path / "o")])
    (line,) = [l for l in capsys.readouterr().err.splitlines() if "angioexp predict" in l]  # MLflow logs its own
    assert code == 2 and line.startswith("angioexp predict: error: key '--model': registered model 'angio-stage9' does not exist")
    assert main(["predict", "--model", str(tmp_path / "nope.pt"), "--input", str(frame), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_output_folder_that_is_or_holds_an_input_is_refused_and_nothing_is_deleted(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    data = tmp_path / "data"
    data.mkdir()
    frame = data / "f.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(frame)
    (data / "index.csv").write_text("case_id,cine_path,frame_index\n")
    before = sorted(p.name for p in data.iterdir())
    for out in (frame, data, tmp_path):  # the input itself, its folder, a folder above
        code = main(["predict", "--model", str(ckpt), "--input", str(frame), "--out", str(out), "--overwrite"])
        assert code == 2 and "the input" in capsys.readouterr().err
    # a CSV's folder holds its cines: an output inside it is refused too
    assert main(["predict", "--model", str(ckpt), "--input", str(data / "index.csv"), "--out", str(data / "o")]) == 2
    assert sorted(p.name for p in data.iterdir()) == before and frame.is_file()


def test_centreline_lengths_of_known_shapes():
    bar = np.zeros((40, 140), dtype=bool)
    bar[18:23, 20:120] = True  # 100 px long, 5 px wide
    assert centreline_px(bar) == pytest.approx(100, abs=6)
    diagonal = np.zeros((120, 120), dtype=bool)
    for i in range(10, 110):
        diagonal[i, i - 1 : i + 2] = True
    assert centreline_px(diagonal) == pytest.approx(100 * np.sqrt(2), rel=0.05)
    assert centreline_px(np.zeros((8, 8), bool)) == 0.0


def test_stage2_prompts_are_segment_names(checkpoint):
    from angioexp.config import load_config
    from angioexp.predict import categories_for

    cfg2 = load_config(None, ["init_from=none"], stage=2)
    assert [c["id"] for c in categories_for(cfg2, ["6", "lad_mid", "9a"])] == [6, 7, 17]
    assert len(categories_for(cfg2, None)) == 26
    with pytest.raises(InputError, match="unknown segment"):
        categories_for(cfg2, ["LAD"])


def test_a_sam3_model_without_the_sam3_extra_says_how_to_install(tmp_path):
    import importlib.util

    import torch

    if importlib.util.find_spec("sam3") is not None:
        pytest.skip("the sam3 extra is installed here")
    torch.save({"model": {"w": torch.zeros(1)}, "config": {"backend": "sam3", "stage": 1}}, tmp_path / "sam3.pt")
    frame = tmp_path / "f.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(frame)
    with pytest.raises(InputError, match=r"is a SAM3 model: install the sam3 extra first \(pip install 'angioexp\[sam3\]'"):
        predict(str(tmp_path / "sam3.pt"), [frame], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_bare_sam3_state_dict_is_recognised_as_sam3(checkpoint, tmp_path):
    """A SAM3 run's model_weights.pt carries no config: its tensor names say it is SAM3."""
    import importlib.util

    import torch

    from angioexp.predict import _stored_backend

    ckpt, _ = checkpoint
    assert _stored_backend(ckpt) == "core"
    bare = tmp_path / "model_weights.pt"
    torch.save({"backbone.vision_backbone.trunk.patch_embed.proj.weight": torch.zeros(2),
                "backbone.language_backbone.encoder.positional_embedding": torch.zeros(2)}, bare)
    assert _stored_backend(bare) == "sam3"
    if importlib.util.find_spec("sam3") is None:
        frame = tmp_path / "f.png"
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(frame)
        with pytest.raises(InputError, match=r"is a SAM3 model: install the sam3 extra first"):
            predict(str(bare), [frame], tmp_path / "out")


def test_a_stage1_model_writes_no_arcade_file_and_refuses_arcade(checkpoint, tmp_path, capsys):
    ckpt, coco = checkpoint
    frame = next((coco / "val" / "images").glob("*.png"))
    assert main(["predict", "--model", str(ckpt), "--input", str(frame), "--out", str(tmp_path / "o")]) == 0
    assert "no ARCADE file: ARCADE's format holds SYNTAX segments, and this is a Stage 1 model" in capsys.readouterr().out
    assert not (tmp_path / "o" / "arcade.json").exists()
    code = main(["predict", "--model", str(ckpt), "--input", str(frame), "--out", str(tmp_path / "o2"),
                 "--arcade", str(tmp_path / "a.json")])
    assert code == 2 and "this is a Stage 1 model" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "a.json").exists()


def test_overlay_png_and_animated_png_are_lossless():
    import io

    from angioexp.predict.outputs import apng, png

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (37, 51, 3), dtype=np.uint8) for _ in range(3)]
    with Image.open(io.BytesIO(png(frames[0]))) as image:
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), frames[0])
    with Image.open(io.BytesIO(apng(frames, fps=12.5))) as movie:
        assert movie.n_frames == 3 and movie.info["duration"] == 80
        for k, expected in enumerate(frames):
            movie.seek(k)
            assert np.array_equal(np.asarray(movie.convert("RGB")), expected)


def test_stage2_model_labels_only_the_prompted_segments(tmp_path):
    from tests.helpers.vessel_coco import STAGE2_LABELS

    coco = make_vessel_coco(tmp_path / "coco", stage=2, size=64, n_train=4, n_val=2, seed=2)
    assert main(["train", "--stage", "2", "--no-tracking", "--init-from", "none", "--coco-dir", str(coco),
                 "--out", str(tmp_path / "run"), "--max-steps", "2", *BASE]) == 0
    frame = next((coco / "val" / "images").glob("*.png"))
    prompts = [str(label) for label in STAGE2_LABELS[:2]]
    summary = predict(str(tmp_path / "run" / "checkpoints" / "last.pt"), [frame], tmp_path / "out", prompts=prompts,
                      threshold=0.0)
    assert [c["id"] for c in summary["categories"]] == list(STAGE2_LABELS[:2])
    assert summary["arcade"] == str(tmp_path / "out" / "arcade.json") and summary["no_arcade"] is None
    labels = np.load(tmp_path / "out" / frame.stem / "labels" / "frame_0000.npy")
    assert set(np.unique(labels).tolist()) <= {0, *STAGE2_LABELS[:2]} and labels.any()
    table = _rows(tmp_path / "out" / "segments.csv")
    assert {int(r["label"]) for r in table} == set(np.unique(labels).tolist()) - {0}
    assert all(r["centreline_mm"] == "" for r in table)  # a PNG knows no pixel spacing


def test_cine_video_is_an_mp4_with_imageio_ffmpeg(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    from angioexp.predict.outputs import write_video

    frames = [np.full((33, 47, 3), 40 * k, dtype=np.uint8) for k in range(5)]  # odd sides: padded to even
    path = write_video(tmp_path, frames, fps=12.5)
    assert path.name == "overlay.mp4" and path.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.mp4"]  # no temporary left
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    assert tuple(meta["size"]) == (48, 34) and abs(meta["fps"] - 12.5) < 0.1
    assert sum(1 for _ in reader) == 5


def test_a_runs_uri_resolves_through_the_training_resolver(checkpoint, tmp_path, mlflow_uri):
    import mlflow

    ckpt, _ = checkpoint
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(ckpt), "ckpt")
    frame = tmp_path / "f.png"
    Image.fromarray(np.full((48, 48), 90, np.uint8)).save(frame)
    summary = predict(f"runs:/{run.info.run_id}/ckpt/last.pt", [frame], tmp_path / "out")
    assert summary["model"]["run_id"] == run.info.run_id and summary["frames"] == 1
    assert (tmp_path / "out" / "f" / "labels" / "frame_0000.npy").is_file()
