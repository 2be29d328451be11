"""angioexp.backends.sam3.writer: SAM3's scalar names → docs/design.md#metric-keys, streamed live into real MLflow.

The writer needs no sam3 package, so these tests run in the main environment too.
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from angioexp.backends.sam3.writer import MlflowScalarWriter, make_mlflow_writer, map_key


@pytest.mark.parametrize("sam3_key, ours", [
    ("Step_Losses/Losses/train_all_loss", "train/loss"),
    ("Step_Losses/Losses/train_all_loss/loss_mask", "train/loss_mask"),
    ("Step_Losses/Losses/train_all_loss/loss_bbox_aux_2_o2m", "train/loss_bbox_aux_2_o2m"),
    ("Losses/train_all_loss", "train/epoch_loss"),
    ("Losses/train_all_loss_dice", "train/epoch_loss_dice"),
    ("Losses/train_all_core_loss", None),
    ("Meters_train/val_angio/segm/coco_eval_segm_AP", "val/AP"),
    ("Meters_train/val_angio/segm/coco_eval_segm_AP_50", "val/AP50"),
    ("Meters_train/val_angio/segm/coco_eval_segm_AP_75", "val/AP75"),
    ("Meters_train/val_angio/segm/coco_eval_segm_AR_maxDets@100", "val/AR100"),
    ("Meters_train/val_angio/detection/coco_eval_bbox_AP_75", "val/bbox_AP75"),
    ("Step_Stats/train/Batch Time", "train/batch_time_s"),
    ("Step_Stats/train/Mem (GB)", "train/mem_gb"),
    ("Optim/0_/lr", None),
    ("Trainer/where", None),
    ("train/nan_events", "train/nan_events"),
])
def test_key_mapping(sam3_key, ours):
    assert map_key(sam3_key) == ours


@pytest.fixture()
def run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sam3-writer", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    yield uri, client, run_id


def test_streams_live_and_maps_to_one_step_axis(run, tmp_path):
    uri, client, run_id = run
    events = tmp_path / "events.jsonl"
    writer = make_mlflow_writer(run_id=run_id, tracking_uri=uri, events_path=str(events), batch_size=4,
                                flush_secs=0.0, should_log=True)  # flush on every call: "live"
    for step in range(3):
        writer.log("Step_Losses/Losses/train_all_loss", 10.0 - step, step)
        writer.log("Step_Losses/Losses/train_all_loss/loss_mask", 1.0 / (step + 1), step)
        writer.log("Step_Stats/train/Batch Time", 2.0, step + 1)  # SAM3: after incrementing
        writer.log("Optim/3_/lr", 1e-4, step)  # dropped
        # already in MLflow while "training": nothing waits for the end of the run
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(step + 1))
    writer.step_for_epoch_logs = 3  # set by GuardedTrainer: val lands on the optimizer-step axis
    writer.log_dict({"Meters_train/val_angio/segm/coco_eval_segm_AP_75": 0.25,
                     "Meters_train/val_angio/segm/coco_eval_segm_AP": 0.2, "Trainer/epoch": 0}, step=0)
    writer.close()

    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/AP75")] == [(3, 0.25)]
    assert client.get_metric_history(run_id, "train/images_per_s")[0].value == 2.0  # 4 images / 2 s
    assert not any(k.startswith("Optim") for k in client.get_run(run_id).data.metrics)
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    train = [e for e in lines if e["kind"] == "train"]
    assert [e["step"] for e in train] == [0, 1, 2]
    assert train[0]["metrics"] == {"train/loss": 10.0, "train/loss_mask": 1.0, "train/batch_time_s": 2.0,
                                   "train/images_per_s": 2.0}
    assert lines[-1] == {"kind": "val", "step": 3, "metrics": {"val/AP75": 0.25, "val/AP": 0.2}}


def test_time_based_sends_keep_a_step_together(tmp_path):
    events = tmp_path / "events.jsonl"
    writer = MlflowScalarWriter(None, events_path=str(events), flush_secs=0.0)
    writer.log("Step_Losses/Losses/train_all_loss", 1.0, 0)
    writer.log("train/grad_norm", 5.0, 0)  # a send happens between the two logs
    writer.close()
    (event,) = [json.loads(line) for line in events.read_text().splitlines()]
    assert event["metrics"] == {"train/loss": 1.0, "train/grad_norm": 5.0}


def test_log_hparams(run):
    uri, client, run_id = run
    writer = MlflowScalarWriter(run_id, uri)
    writer.log_hparams({"lr": 0.1, "resolution": 336}, {"Meters_train/val_angio/segm/coco_eval_segm_AP": 0.5})
    data = client.get_run(run_id).data
    assert data.params == {"lr": "0.1", "resolution": "336"} and data.metrics["val/AP"] == 0.5


def test_non_finite_values_are_kept_as_nan(run):
    uri, client, run_id = run
    writer = MlflowScalarWriter(run_id, uri)
    writer.log("Step_Losses/Losses/train_all_loss", float("inf"), 0)
    writer.close()
    value = client.get_metric_history(run_id, "train/loss")[0].value
    assert value != value  # NaN


def test_resume_drops_steps_already_logged(run):
    uri, client, run_id = run
    first = MlflowScalarWriter(run_id, uri)
    for step in range(4):
        first.log("Step_Losses/Losses/train_all_loss", 1.0, step)
    first.close()  # killed after step 3; SAM3 resumes from its step-2 checkpoint
    second = MlflowScalarWriter(run_id, uri, resume=True)
    for step in range(2, 6):
        second.log("Step_Losses/Losses/train_all_loss", 2.0, step)
    second.close()
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == [0, 1, 2, 3, 4, 5]
