"""The core training loop: it learns, survives NaNs, resumes exactly, fails clearly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from angioexp.checkpoints import read_checkpoint
from angioexp.config import load_config
from angioexp.errors import CheckpointLoadError, ConfigError, InputError, TrainingDiverged
from angioexp.losses import build_criterion
from angioexp.train.callbacks import Callback
from angioexp.train.loop import train
from tests.helpers.vessel_coco import make_vessel_coco


@pytest.fixture(scope="module")
def coco1(tmp_path_factory):
    return make_vessel_coco(tmp_path_factory.mktemp("d1"), stage=1, size=64, n_train=16, n_val=4, empty_train_images=1)


@pytest.fixture(scope="module")
def coco2(tmp_path_factory):
    return make_vessel_coco(tmp_path_factory.mktemp("d2"), stage=2, size=64, n_train=6, n_val=2, seed=3)


def _cfg(tmp_path, *overrides, stage=1, steps=8):
    return load_config(None, [
        "init_from=none", "scratch.resolution=64", "scratch.train_batch_size=2", "scratch.val_batch_size=4",
        f"train.max_steps={steps}", "train.eval_every=1000", "train.checkpoint_every=1000", "train.log_every=1",
        "scratch.scheduler_warmup=2", "scratch.scheduler_cooldown=0", "eval.overlays=0", "nan_guard.snapshot_every=1",
        f"train.out_dir={tmp_path / 'run'}", *overrides,
    ], stage=stage)


class Recorder(Callback):
    def __init__(self):
        self.steps, self.nan, self.evals, self.ckpts, self.start, self.end = [], [], [], [], None, None

    def on_train_start(self, info):
        self.start = info

    def on_step_end(self, step, metrics):
        self.steps.append((step, metrics))

    def on_nan_event(self, step, event):
        self.nan.append((step, event))

    def on_eval_end(self, step, metrics, artifacts):
        self.evals.append((step, metrics, artifacts))

    def on_checkpoint(self, step, path):
        self.ckpts.append((step, path))

    def on_train_end(self, result):
        self.end = result


class NanAt:
    """The real SAM3 objective, except that the loss is NaN at the given (0-based) steps."""

    def __init__(self, cfg, steps):
        self.criterion, self.bad, self.calls = build_criterion(cfg), set(steps), 0

    def __call__(self, outputs, targets):
        losses = self.criterion(outputs, targets)
        if self.calls in self.bad:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
            losses["loss"] = losses["loss"] * float("nan")
        self.calls += 1
        return losses


def test_training_learns_vessels(tmp_path, coco1):
    # IABCEMdetr's IoU-aware scores are still near 0.5 after 40 steps: score Dice at 0.3
    cfg = _cfg(tmp_path, "train.eval_every=20", "scratch.train_batch_size=4", "train.log_every=5",
               "scratch.scheduler_warmup=10", "eval.score_threshold=0.3", steps=40)
    rec = Recorder()
    result = train(cfg, coco_dir=coco1, callbacks=[rec])
    losses = [m["train/loss"] for _, m in rec.steps]
    assert losses[-1] < 0.6 * losses[0]
    assert rec.steps[-1][1]["train/loss_dice"] < 0.5 * rec.steps[0][1]["train/loss_dice"]
    dice = [m["val/dice"] for _, m, _ in rec.evals]
    assert dice[-1] > 0.6 and dice[-1] > dice[0]
    assert rec.evals[-1][1]["val/AP50"] > 0.5
    assert result.final_metrics["val/dice"] == dice[-1] and result.stopped_reason == "max_steps"
    # evaluation and checkpoint files
    eval_dir = tmp_path / "run" / "eval" / "step_40"
    assert json.loads((eval_dir / "metrics.json").read_text())["metrics"]["dice"] == pytest.approx(dice[-1])
    assert (eval_dir / "per_image.csv").is_file() and (eval_dir / "predictions.json").is_file()
    payload = read_checkpoint(result.checkpoint)
    assert payload["step"] == 40 and payload["config"]["scratch"]["resolution"] == 64
    assert result.best_checkpoint.is_file()
    names = set(rec.steps[-1][1])
    assert {"train/loss", "train/loss_mask", "train/grad_norm", "train/lr", "train/nan_events", "train/images_per_s"} <= names


def test_nan_loss_at_random_steps_is_skipped_and_counted(tmp_path, coco1):
    cfg = _cfg(tmp_path, steps=10)
    rec = Recorder()
    result = train(cfg, coco_dir=coco1, callbacks=[rec], criterion=NanAt(cfg, {2, 5, 6}))
    assert result.nan_events == 3 and result.restores == 0 and result.steps == 10
    assert [s for s, _ in rec.nan] == [2, 5, 6]
    assert all(e["action"] == "skip" and e["kind"] == "loss" and "loss_mask" in e["detail"] for _, e in rec.nan)
    assert rec.steps[-1][1]["train/nan_events"] == 3
    assert all(math.isfinite(v) for _, m in rec.steps for v in m.values())
    assert all(torch.isfinite(p).all() for p in read_checkpoint(result.checkpoint)["model"].values())


def test_consecutive_nans_restore_the_last_good_state_and_back_off_the_lr(tmp_path, coco1):
    cfg = _cfg(tmp_path, "nan_guard.max_consecutive=2", "nan_guard.lr_backoff=0.25", steps=8)
    rec = Recorder()
    result = train(cfg, coco_dir=coco1, callbacks=[rec], criterion=NanAt(cfg, {4, 5}))
    assert [e["action"] for _, e in rec.nan] == ["skip", "restore"]
    assert result.restores == 1 and result.nan_events == 2
    lr = {s: m["train/lr"] for s, m in rec.steps}
    base = cfg.scratch.lr_transformer
    from angioexp.train.schedule import InverseSquareRoot

    sched = InverseSquareRoot.from_config(cfg.scratch, 8)
    assert lr[4] == pytest.approx(base * sched.factor(3))  # before: full LR
    assert lr[8] == pytest.approx(base * sched.factor(7) * 0.25)  # after the restore: backed off
    assert rec.steps[-1][1]["train/lr_factor"] == 0.25


def test_too_many_nans_raise_training_diverged_with_its_record(tmp_path, coco1):
    cfg = _cfg(tmp_path, "nan_guard.max_consecutive=2", "nan_guard.max_restores=1", steps=20)
    rec = Recorder()
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, coco_dir=coco1, callbacks=[rec], criterion=NanAt(cfg, set(range(3, 20))))
    err = info.value
    assert err.step == 6 and err.events == 4 and err.lr > 0
    assert [e["action"] for e in err.history] == ["skip", "restore", "skip", "diverged"]
    assert rec.end is not None and rec.end.diverged and rec.end.stopped_reason == "diverged"


def test_an_lr_spike_is_survived(tmp_path, coco1, monkeypatch):
    from angioexp.train import schedule

    normal = schedule.InverseSquareRoot.factor
    monkeypatch.setattr(schedule.InverseSquareRoot, "factor",
                        lambda self, step: 1e36 if step == 4 else normal(self, step))
    cfg = _cfg(tmp_path, "nan_guard.max_consecutive=2", "optim.gradient_clip.max_norm=null", steps=12)
    rec = Recorder()
    result = train(cfg, coco_dir=coco1, callbacks=[rec])
    assert result.nan_events >= 2 and result.restores >= 1 and result.steps == 12
    assert all(torch.isfinite(p).all() for p in read_checkpoint(result.checkpoint)["model"].values())
    assert math.isfinite(rec.steps[-1][1]["train/loss"])


class ExplodeAt(NanAt):
    """The real objective, except that the loss is 1000× larger (still finite) at the given steps."""

    def __call__(self, outputs, targets):
        losses = self.criterion(outputs, targets)
        if self.calls in self.bad:
            losses["loss"] = losses["loss"] * 1000.0
        self.calls += 1
        return losses


def test_an_exploding_finite_loss_is_a_bad_step_and_can_end_the_run(tmp_path, coco1):
    # One exploding step is skipped like a NaN step (kind "explosion"), the reference being the
    # run's first loss; a run that keeps exploding through every restore is declared diverged.
    cfg = _cfg(tmp_path, "nan_guard.max_consecutive=2", "nan_guard.max_restores=1", steps=20)
    rec = Recorder()
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, coco_dir=coco1, callbacks=[rec], criterion=ExplodeAt(cfg, {2, *range(5, 20)}))
    kinds = [(s, e["kind"], e["action"]) for s, e in rec.nan]
    assert kinds[0] == (2, "explosion", "skip")
    assert [(s, a) for s, _, a in kinds] == [(2, "skip"), (5, "skip"), (6, "restore"), (7, "skip")]
    assert "nan_guard.max_loss_ratio" in rec.nan[0][1]["detail"] and info.value.step == 8
    assert all(h["kind"] == "explosion" for h in info.value.history)

    # With the check off, the same losses are ordinary steps: the run completes.
    cfg_off = _cfg(tmp_path / "off", "nan_guard.max_loss_ratio=null", steps=8)
    result = train(cfg_off, coco_dir=coco1, callbacks=[rec := Recorder()], criterion=ExplodeAt(cfg_off, {2, 5}))
    assert result.nan_events == 0 and result.steps == 8 and not rec.nan


def test_the_guard_checks_losses_against_the_runs_first_loss():
    from angioexp.config import NanGuardConfig
    from angioexp.train.nan_guard import NanGuard

    model = torch.nn.Linear(2, 1)
    guard = NanGuard(NanGuardConfig(max_loss_ratio=100.0), model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert guard.check_loss(torch.tensor(2.0)) is None and guard.reference_loss == 2.0
    assert guard.check_loss(150.0) is None  # 75×: a spike, not an explosion
    kind, detail = guard.check_loss(torch.tensor(250.0))
    assert kind == "explosion" and "250" in detail and "initial loss 2" in detail
    assert guard.check_loss(float("inf"))[0] == "loss" and guard.check_loss(float("nan"))[0] == "loss"
    restored = NanGuard(NanGuardConfig(), model, torch.optim.SGD(model.parameters(), lr=0.1))
    restored.load_state_dict(guard.state_dict())  # --resume keeps the reference
    assert restored.check_loss(250.0)[0] == "explosion"
    off = NanGuard(NanGuardConfig(max_loss_ratio=None), model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert off.check_loss(1.0) is None and off.check_loss(1e9) is None
    with pytest.raises(ConfigError, match="nan_guard.max_loss_ratio"):
        load_config(None, ["nan_guard.max_loss_ratio=0.5"])


def test_a_restore_leaves_the_guards_snapshot_untouched_by_later_steps():
    """Restoring hands the optimizer copies: stepping after a restore must not rewrite the
    snapshot, or the next restore would go back to a state that never was good."""
    from angioexp.config import NanGuardConfig
    from angioexp.train.nan_guard import NanGuard

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step():
        optimizer.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()

    guard = NanGuard(NanGuardConfig(max_consecutive=1, max_restores=5, snapshot_every=1000), model, optimizer)
    step()
    guard.good_step(0)
    kept = {k: v.clone() for k, v in guard._snapshot["optimizer"]["state"][0].items()}
    guard.bad_step(1, "loss")  # restores
    step()
    step()
    after = guard._snapshot["optimizer"]["state"][0]
    assert all(torch.equal(after[k], kept[k]) for k in kept)
    guard.bad_step(2, "loss")  # the second restore goes back to the same good state
    assert all(torch.equal(optimizer.state_dict()["state"][0][k], kept[k]) for k in kept)


class KillAfterCheckpoint(Callback):
    def __init__(self, at):
        self.at = at

    def on_checkpoint(self, step, path):
        if step == self.at:
            raise KeyboardInterrupt("simulated kill")


@pytest.mark.parametrize("ema", [None, 0.9], ids=["raw", "ema"])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, coco1, ema):
    # point-sampled mask loss: the torch RNG matters, so it must be restored too
    extra = ("loss.masks.num_sample_points=64", "train.checkpoint_every=3", "scratch.crop_size=48",
             f"train.ema_decay={'null' if ema is None else ema}")
    whole = train(_cfg(tmp_path / "a", *extra, steps=7), coco_dir=coco1)
    cfg = _cfg(tmp_path / "b", *extra, steps=7)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, coco_dir=coco1, callbacks=[KillAfterCheckpoint(3)])
    assert read_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")["step"] == 3
    rec = Recorder()
    resumed = train(cfg, coco_dir=coco1, resume_from=tmp_path / "b" / "run", callbacks=[rec])
    assert rec.start.start_step == 3 and [s for s, _ in rec.steps] == [4, 5, 6, 7]
    a, b = read_checkpoint(whole.checkpoint), read_checkpoint(resumed.checkpoint)
    assert a["step"] == b["step"] == 7
    for key in ("model", "raw_model") if ema else ("model",):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert a.get("ema_updates") == b.get("ema_updates") == (7 if ema else None)
    assert resumed.final_metrics["val/dice"] == whole.final_metrics["val/dice"]


def test_weight_averaging_is_what_gets_evaluated_and_kept(tmp_path, coco1):
    from angioexp.train.inference import evaluate_split

    cfg = _cfg(tmp_path, "train.ema_decay=0.5", "train.eval_every=6", steps=6)
    result = train(cfg, coco_dir=coco1, criterion=NanAt(cfg, steps=[2]))
    last = read_checkpoint(result.checkpoint)
    assert last["ema_updates"] == 5  # the NaN step was skipped, so not averaged in
    assert any(not torch.equal(t, last["raw_model"][k]) for k, t in last["model"].items() if t.is_floating_point())
    # best.pt and last.pt hand on the averaged weights: scoring them again gives the logged metrics
    assert read_checkpoint(result.best_checkpoint)["step"] == 6
    for k, t in read_checkpoint(result.best_checkpoint)["model"].items():
        assert torch.equal(t, last["model"][k]), k
    again, _, _ = evaluate_split(result.checkpoint, coco1, "val", device="cpu")
    assert again["val/dice"] == pytest.approx(result.final_metrics["val/dice"])
    with pytest.raises(InputError, match="train.ema_decay"):
        _cfg(tmp_path, "train.ema_decay=1.0")


def test_a_corrupt_checkpoint_on_resume_is_a_clear_error(tmp_path, coco1):
    cfg = _cfg(tmp_path, steps=2)
    train(cfg, coco_dir=coco1)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, e.g. a full disk
    with pytest.raises(InputError, match="cannot read checkpoint") as info:
        train(cfg, coco_dir=coco1, resume_from=tmp_path / "run")
    assert str(last) in str(info.value)
    torch.save({"weights": torch.zeros(2)}, last)
    with pytest.raises(InputError, match="missing model, optimizer, step, config"):
        train(cfg, coco_dir=coco1, resume_from=last)
    with pytest.raises(InputError, match="no checkpoint to resume from"):
        train(cfg, coco_dir=coco1, resume_from=tmp_path / "nowhere")


def test_stage2_starts_from_stage1_weights_with_a_load_report(tmp_path, coco1, coco2):
    s1 = train(_cfg(tmp_path / "s1", steps=2), coco_dir=coco1)
    rec = Recorder()
    cfg2 = _cfg(tmp_path / "s2", stage=2, steps=2)
    result = train(cfg2, coco_dir=coco2, init_checkpoint=s1.checkpoint, callbacks=[rec])
    report = rec.start.extra["init_report"]
    assert report.loaded_fraction == 1.0 and report.source == str(s1.checkpoint)
    assert "val/dice_mean_segments" in result.final_metrics


def test_stage2_without_the_per_prompt_objective_trains_only_the_identity_path(tmp_path, coco2):
    """loss.per_prompt=false: no prompt is decoded in training, so the query decoder gets no
    gradient, the step's losses are the identity and view terms, and evaluation still scores
    segments through the identity head."""
    from angioexp.model.build import build_model

    cfg = _cfg(tmp_path, "loss.per_prompt=false", "nan_guard.max_loss_ratio=null", stage=2, steps=3)
    rec = Recorder()
    result = train(cfg, coco_dir=coco2, callbacks=[rec])
    trained = torch.load(result.checkpoint, map_location="cpu", weights_only=True)["model"]
    start = build_model(cfg).state_dict()  # same seed → the weights the run started from
    decoder = [k for k in start if k.startswith("transformer.decoder.")]
    identity = [k for k in start if k.startswith("transformer.identity.")]
    assert decoder and identity
    assert all(torch.equal(start[k], trained[k]) for k in decoder)
    assert any(not torch.equal(start[k], trained[k]) for k in identity)
    terms = {k for _, metrics in rec.steps for k in metrics if k.startswith("train/loss_")}
    assert terms and all("identity" in k or "view" in k for k in terms), terms
    assert "val/segments/dice_common" in result.final_metrics


def test_per_prompt_off_needs_the_identity_head():
    with pytest.raises(ConfigError, match="loss.per_prompt.*model.identity_head"):
        load_config(None, ["loss.per_prompt=false", "model.identity_head=false"], stage=2)
    with pytest.raises(ConfigError, match="loss.per_prompt"):
        load_config(None, ["loss.per_prompt=false"], stage=1)


def test_an_init_checkpoint_that_does_not_fit_fails_before_any_step(tmp_path, coco1):
    other = train(_cfg(tmp_path / "other", "model.d_model=64", steps=1), coco_dir=coco1)
    cfg = _cfg(tmp_path / "new", "min_loaded_fraction=0.9", steps=5)
    rec = Recorder()
    with pytest.raises(CheckpointLoadError, match="min_loaded_fraction") as info:
        train(cfg, coco_dir=coco1, init_checkpoint=other.checkpoint, callbacks=[rec])
    assert info.value.report.loaded_fraction < 0.9 and info.value.report.shape_mismatched
    assert rec.steps == [] and not (tmp_path / "new" / "run" / "checkpoints").exists()


def test_time_budget_stops_cleanly_with_evaluation_and_checkpoint(tmp_path, coco1):
    cfg = _cfg(tmp_path, "train.budget_minutes=0.00001", steps=50)
    rec = Recorder()
    result = train(cfg, coco_dir=coco1, callbacks=[rec])
    assert result.stopped_reason == "budget" and result.steps == 1
    assert [s for s, *_ in rec.evals] == [1] and [s for s, _ in rec.ckpts] == [1]


def test_pruning_from_a_callback_checkpoints_and_reraises(tmp_path, coco1):
    optuna = pytest.importorskip("optuna")

    class Prune(Callback):
        def on_eval_end(self, step, metrics, artifacts):
            raise optuna.TrialPruned()

    rec = Recorder()
    with pytest.raises(optuna.TrialPruned):
        train(_cfg(tmp_path, "train.eval_every=2", steps=6), coco_dir=coco1, callbacks=[Prune(), rec])
    assert rec.end.pruned and rec.end.steps == 2 and rec.end.stopped_reason == "pruned"
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def test_both_backends_answer_to_one_interface(tmp_path, coco1):
    import importlib.util

    from angioexp.backends import BACKENDS, get_backend

    assert sorted(BACKENDS) == ["core", "sam3"]
    with pytest.raises(InputError, match="unknown backend 'tpu'"):
        get_backend("tpu")
    if importlib.util.find_spec("sam3") is None:  # refused in seconds, before data or a run exist
        with pytest.raises(InputError, match="needs the sam3 package"):
            get_backend("sam3").check(_cfg(tmp_path, "backend=sam3"))
    core = get_backend("core")
    core.check(_cfg(tmp_path))
    s1 = core.train(_cfg(tmp_path / "s1", steps=2), data=coco1)
    other = _cfg(tmp_path / "other", "model.d_model=64", "min_loaded_fraction=0.9", steps=2)
    with pytest.raises(CheckpointLoadError):
        core.check_init(other, s1.checkpoint)
    rec = Recorder()
    result = core.train(_cfg(tmp_path / "s1b", steps=2), data=coco1, init=s1.checkpoint, callbacks=[rec])
    assert result.steps == 2 and rec.end is result and rec.start.extra["init_report"].loaded_fraction == 1.0


def test_the_loop_takes_weights_files_and_leaves_uris_to_its_caller(tmp_path, coco1):
    cfg = _cfg(tmp_path, "init_from=models:/angio-stage1@champion", steps=1)
    with pytest.raises(InputError, match="resolved by the caller"):
        train(cfg, coco_dir=coco1)
