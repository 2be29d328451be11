"""DDP on CPU: two gloo processes end with identical weights and take the same NaN decisions."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers.vessel_coco import make_vessel_coco


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, coco: str, out: str, nan_step: int) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from angioexp.config import load_config
    from angioexp.losses import build_criterion
    from angioexp.train import loop

    cfg = load_config(None, [
        "init_from=none", "scratch.resolution=64", "scratch.train_batch_size=2", "train.max_steps=5",
        "train.eval_every=5", "train.checkpoint_every=100", "train.log_every=1", "eval.overlays=0",
        "scratch.scheduler_warmup=1", f"train.out_dir={out}/run", "train.device=cpu",
    ], stage=1)
    captured = {}
    build_optimizer = loop.build_optimizer

    def capture(model, cfg_):  # keep this rank's model to compare weights afterwards
        captured["model"] = model
        return build_optimizer(model, cfg_)

    loop.build_optimizer = capture
    criterion = build_criterion(cfg)
    calls = {"n": 0}

    def nan_on_rank1(outputs, targets):
        losses = criterion(outputs, targets)
        if rank == 1 and calls["n"] == nan_step:  # only ONE rank sees a NaN
            losses["loss"] = losses["loss"] * float("nan")
        calls["n"] += 1
        return losses

    result = loop.train(cfg, coco_dir=coco, criterion=nan_on_rank1)
    torch.save({"state": captured["model"].state_dict(), "nan_events": result.nan_events, "steps": result.steps,
                "dice": result.final_metrics.get("val/dice")}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_end_identical_and_skip_nans_together(tmp_path):
    coco = make_vessel_coco(tmp_path / "coco", stage=1, size=64, n_train=8, n_val=2)
    mp.spawn(_worker, args=(2, _free_port(), str(coco), str(tmp_path), 2), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["nan_events"] == r1["nan_events"] == 1  # rank 0's loss was finite, yet it skipped too
    assert r0["steps"] == r1["steps"] == 5
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), name
    assert r0["dice"] is not None and r1["dice"] is None  # rank 0 alone evaluates
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
