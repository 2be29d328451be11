"""Stage 1 → registry → Stage 2 from it, read back through MlflowClient and over REST.

Real training (the core backend, tiny settings) on the conftest synthetic COCO fixtures, a real
SQLite tracking store, a real ``mlflow server`` on 127.0.0.1 for the REST part.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest

mlflow = pytest.importorskip("mlflow")
torch = pytest.importorskip("torch")

from angioexp.config import load_config  # noqa: E402
from tests.helpers.tracking_store import copy_of_migrated_store, mlflow_server  # noqa: E402

pytestmark = pytest.mark.slow

# A few seconds of training per stage on 2 CPU cores: enough for two evaluations + checkpoints.
TINY = [
    "scratch.resolution=128", "scratch.train_batch_size=2", "scratch.val_batch_size=4",
    "train.max_steps=12", "train.eval_every=6", "train.checkpoint_every=6", "train.log_every=3",
    "data.max_val_images=4", "eval.overlays=2", "train.device=cpu",
]


def tiny_config(coco_dir: Path, stage: int, extra=()):
    return load_config(overrides=[*TINY, f"data.coco_dir={coco_dir}", *extra], stage=stage)


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


@pytest.fixture(scope="module")
def two_stages(coco_stage1, coco_stage2, tmp_path_factory, _migrated_store):
    from angioexp.tracking.session import tracked_train

    root = tmp_path_factory.mktemp("e2e")
    uri = copy_of_migrated_store(_migrated_store, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("ANGIOEXP_ARTIFACT_ROOT", str(root / "mlartifacts"))
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.chdir(root)
        r1 = tracked_train(tiny_config(coco_stage1, 1), argparse.Namespace())
        r2 = tracked_train(tiny_config(coco_stage2, 2), argparse.Namespace())  # init_from: models:/angio-stage1@champion
        yield SimpleNamespace(uri=uri, root=root, r1=r1, r2=r2)
    mlflow.set_tracking_uri(None)


def _only_run(client, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_stage1_then_stage2_read_back_through_the_client(two_stages, tmp_path):
    client = mlflow.MlflowClient(two_stages.uri)
    s1 = _only_run(client, "angioexp-stage1")
    s2 = _only_run(client, "angioexp-stage2")

    for run, stage in ((s1, "1"), (s2, "2")):
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert tags["stage"] == stage and tags["backend"] == "core"
        assert len(tags["dataset.digest"]) >= 8 and len(tags["git.sha"]) in (40, 7) or tags["git.sha"] == "unknown"
        # params: the flattened config incl. the effective learning rates
        params = run.data.params
        assert float(params["scratch.lr_transformer"]) == pytest.approx(8e-4 * float(params["scratch.lr_scale"]))
        assert float(params["scratch.lr_language_backbone"]) == pytest.approx(5e-5 * float(params["scratch.lr_scale"]))
        assert run.data.params["train.max_steps"] == "12"
        # per-step and per-eval metrics, complete and in order
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [3, 6, 9, 12]
        loss_term = "train/loss_mask" if stage == "1" else "train/loss_identity_ce"  # core Stage 2: no prompt decoded
        for key in ("train/grad_norm", "train/lr", "train/nan_events", "train/images_per_s", loss_term):
            assert key in run.data.metrics, key
        if stage == "2":
            assert "train/loss_mask" not in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/AP75")] == [6, 12]
        assert {"val/AP", "val/AP50", "val/AP75_tol", "val/dice", "val/cldice"} <= set(run.data.metrics)
        assert any(k.startswith("system/") for k in run.data.metrics), "system metrics"
        # datasets as inputs
        contexts = sorted(t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context")
        assert contexts == ["training", "validation"]
        # artifacts: config, evaluations, learning curve
        files = _artifacts(client, run.info.run_id)
        assert {"config/config.yaml", "plots/learning_curves.png", "eval/step_000012/metrics.json",
                "eval/step_000012/per_image.csv"} <= files
        assert any(f.startswith("eval/step_000012/overlays/") for f in files)
        assert tags["registered.version"] == "1"

    assert s1.info.run_name.startswith("s1-core-")
    assert s2.info.run_name.startswith("s2-core-from-s1v1-") and s2.data.tags["lineage"] == "s2<-s1v1"

    # Stage 2 started from Stage 1's champion, verified
    p = s2.data.params
    assert p["init.source"] == "models:/angio-stage1@champion"
    assert float(p["init.loaded_fraction"]) >= 0.9 and int(p["init.loaded"]) > 0
    assert {"init.missing", "init.unexpected", "init.shape_mismatched"} <= set(p)
    assert "init/load_report.json" in _artifacts(client, s2.info.run_id)
    assert s2.data.tags["init.model_name"] == "angio-stage1" and s2.data.tags["init.version"] == "1"

    # registry: both stages, aliases, lineage
    # (core Stage 2 chooses its champion on the segment headline, STAGE_DEFAULTS)
    for name, run, primary in (("angio-stage1", s1, "val/AP75_tol"), ("angio-stage2", s2, "val/segments/dice_common")):
        model = client.get_registered_model(name)
        assert {a: str(v) for a, v in model.aliases.items()} == {"champion": "1", "challenger": "1"}
        mv = client.get_model_version(name, "1")
        assert mv.run_id == run.info.run_id
        assert mv.tags["primary_metric"] == primary
    assert client.get_model_version("angio-stage2", "1").tags["init_from.version"] == "angio-stage1/1"

    # the registered model: weights_only-loadable state dict, and a working pyfunc
    from angioexp.tracking.models import resolve_model

    resolved = resolve_model("models:/angio-stage2@champion", dst=tmp_path / "w")
    state = torch.load(resolved.weights, weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    import numpy as np
    import pandas as pd
    from PIL import Image

    image_path = sorted((Path(s2.data.tags["angioexp.coco_dir"]) / "val" / "images").glob("*.png"))[0]
    model = mlflow.pyfunc.load_model("models:/angio-stage2@champion")
    frame = pd.DataFrame({"image": [np.asarray(Image.open(image_path)), str(image_path)],
                          "prompt": ["proximal left anterior descending", "mid right coronary artery"]})
    predictions = model.predict(frame, params={"score_threshold": 0.0})
    assert list(predictions.columns) == ["row", "prompt", "score", "segmentation"]
    assert len(predictions) > 0 and set(predictions["row"]) <= {0, 1}
    assert predictions["segmentation"].iloc[0]["size"] == list(np.asarray(Image.open(image_path)).shape)


def test_mlflow_server_serves_the_runs_over_rest(two_stages):
    import requests

    with mlflow_server(two_stages.uri) as base:
        experiments = requests.post(f"{base}/api/2.0/mlflow/experiments/search", json={"max_results": 100}, timeout=30).json()
        ids = {e["name"]: e["experiment_id"] for e in experiments["experiments"]}
        runs = requests.post(f"{base}/api/2.0/mlflow/runs/search",
                             json={"experiment_ids": [ids["angioexp-stage1"], ids["angioexp-stage2"]]}, timeout=30).json()["runs"]
        assert len(runs) == 2
        by_stage = {next(t["value"] for t in r["data"]["tags"] if t["key"] == "stage"): r for r in runs}
        assert set(by_stage) == {"1", "2"}
        s2_params = {p["key"]: p["value"] for p in by_stage["2"]["data"]["params"]}
        assert s2_params["init.source"] == "models:/angio-stage1@champion"
        history = requests.get(f"{base}/api/2.0/mlflow/metrics/get-history",
                               params={"run_id": by_stage["1"]["info"]["run_id"], "metric_key": "val/AP75"}, timeout=30).json()
        assert [m["step"] for m in history["metrics"]] == [6, 12]
        alias = requests.get(f"{base}/api/2.0/mlflow/registered-models/alias",
                             params={"name": "angio-stage2", "alias": "champion"}, timeout=30).json()
        assert alias["model_version"]["version"] == "1"

        # the client pointed at the server sees the same registry
        client = mlflow.MlflowClient(base)
        assert str(client.get_model_version_by_alias("angio-stage1", "champion").version) == "1"
