"""GuardedTrainer: SAM3's trainer step with angioexp's NaN-guard semantics.

The trainer's step methods run on a tiny model (SAM3's Optimizer, GradScaler, GradientClipper
and AverageMeter are the real ones), in the order SAM3's ``train_epoch`` calls them: _run_step,
step_schedulers, scaler.unscale_, clip, scaler.step, scaler.update.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from tests.helpers.skips import SAM3_MISSING

pytest.importorskip("sam3", reason=SAM3_MISSING)
import torch  # noqa: E402
from sam3.train.optim.optimizer import GradientClipper, Optimizer  # noqa: E402
from sam3.train.trainer import Trainer  # noqa: E402
from sam3.train.utils.train_utils import AverageMeter  # noqa: E402

from angioexp.backends.sam3.trainer import GuardedTrainer, SkippableScaler  # noqa: E402
from angioexp.config import NanGuardConfig  # noqa: E402
from angioexp.errors import InputError, TrainingDiverged  # noqa: E402

pytestmark = pytest.mark.sam3
LOSS_KEY = "Losses/train_all_loss"
BASE_LR = 0.1


class Recorder:
    def __init__(self):
        self.logged = []

    def log(self, name, value, step):
        self.logged.append((name, float(value), step))


def make_trainer(tmp_path, *, nan_steps=(), amp_scaler=False, skippable=True, **guard):
    """A GuardedTrainer around a 4→1 linear model whose loss is NaN at ``nan_steps``."""
    t = object.__new__(GuardedTrainer)
    torch.manual_seed(0)
    t.model = torch.nn.Linear(4, 1)
    t.device = torch.device("cpu")
    t.steps = {"train": 0, "val": 0}
    t.gradient_accumulation_steps = 1
    t.optim_conf = SimpleNamespace(amp=SimpleNamespace(enabled=False, amp_dtype="bfloat16"))
    t.logging_conf = SimpleNamespace(log_scalar_frequency=1)
    t.logger = Recorder()
    t.distributed_rank = 0
    t.events_path = tmp_path / "events.jsonl"
    t.loss_hook = None
    t.nan_guard_cfg = NanGuardConfig(**{"max_consecutive": 2, "lr_backoff": 0.5, "max_restores": 2, "snapshot_every": 1, **guard})
    t.optim = Optimizer(torch.optim.SGD(t.model.parameters(), lr=BASE_LR), schedulers=[{"lr": lambda where: BASE_LR}])
    t._install_guard()
    scaler = torch.amp.GradScaler("cpu", enabled=amp_scaler)
    t.scaler = SkippableScaler(scaler) if skippable else scaler
    x = torch.randn(8, 4)

    def step(batch, model, phase):  # SAM3's Trainer._step: loss dict, batch size, extra losses
        k = t.steps[phase]
        t.steps[phase] += 1
        loss = model(x).pow(2).mean()
        return {LOSS_KEY: loss * math.nan if k in nan_steps else loss}, 8, {"Losses/train_all_loss_mask": loss.detach()}

    t._step = step
    return t


def sam3_step(t, run_step=None):
    """One iteration of SAM3's train_epoch after _run_step (trainer.py, the 'Optimizer step' part)."""
    loss_mts = {LOSS_KEY: AverageMeter(LOSS_KEY, t.device, ":.2e")}
    (run_step or t._run_step)(None, "train", loss_mts, {})
    t.optim.step_schedulers(0.5, t.steps["train"])
    t.scaler.unscale_(t.optim.optimizer)
    GradientClipper(max_norm=0.1)(model=t.model)
    t.scaler.step(t.optim.optimizer)
    t.scaler.update()


def weights(t):
    return [p.detach().clone() for p in t.model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_sam3_trainer_dies_on_a_nan_loss(tmp_path):
    t = make_trainer(tmp_path, nan_steps={0})
    with pytest.raises(FloatingPointError):
        sam3_step(t, run_step=lambda *a: Trainer._run_step(t, *a))


def test_nan_step_is_skipped_and_counted(tmp_path):
    t = make_trainer(tmp_path, nan_steps={1})
    sam3_step(t)  # good
    before = weights(t)
    sam3_step(t)  # NaN: skipped
    assert same(before, weights(t)) and t.guard.events == 1
    sam3_step(t)  # good again: training goes on
    assert not same(before, weights(t))
    assert ("train/nan_events", 1.0, 1) in t.logger.logged
    event = json.loads(t.events_path.read_text().splitlines()[0])
    assert event["kind"] == "nan" and event["step"] == 1 and event["event"]["action"] == "skip"


def test_an_exploding_finite_loss_is_skipped_like_a_nan(tmp_path):
    t = make_trainer(tmp_path)
    t.loss_hook = lambda loss, step: loss * 1e4 if step == 1 else loss
    sam3_step(t)  # the run's first loss: the reference
    before = weights(t)
    sam3_step(t)  # finite, but 10⁴× the first: skipped
    assert same(before, weights(t)) and t.guard.events == 1
    event = json.loads(t.events_path.read_text().splitlines()[0])["event"]
    assert event["kind"] == "explosion" and "nan_guard.max_loss_ratio" in event["detail"]
    sam3_step(t)
    assert not same(before, weights(t))


def test_too_little_disk_for_checkpoints_fails_before_the_first_step(tmp_path):
    """The real free space of tmp_path against what the run will write: the 5-parameter model
    fits; with a 10¹⁵-element parameter (on the meta device: sized, never allocated) it cannot."""
    t = make_trainer(tmp_path)
    t.mode, t.skip_saving_ckpts, t.max_epochs, t.epoch = "train", False, 2, 0
    t.checkpoint_conf = SimpleNamespace(save_dir=str(tmp_path / "run" / "checkpoints"))  # not created yet
    t._check_disk_for_checkpoints()
    t.model.huge = torch.nn.Parameter(torch.empty(10**15, device="meta"))
    t.optim.optimizer.add_param_group({"params": [t.model.huge]})
    with pytest.raises(InputError) as info:
        t._check_disk_for_checkpoints()
    message = str(info.value)
    assert info.value.key == "train.out_dir" and str(tmp_path / "run" / "checkpoints") in message
    assert "needs ~24000000.0 GB" in message and "model 4000000.0 GB + AdamW state 8000000.0 GB" in message
    t.skip_saving_ckpts = True  # save_checkpoints=False (timing runs) writes nothing
    t._check_disk_for_checkpoints()


def test_skip_with_amp_needs_the_skippable_scaler(tmp_path):
    plain = make_trainer(tmp_path, nan_steps={1}, amp_scaler=True, skippable=False)
    sam3_step(plain)
    with pytest.raises(AssertionError, match="No inf checks"):
        sam3_step(plain)  # GradScaler.step on a step without gradients
    guarded = make_trainer(tmp_path, nan_steps={0}, amp_scaler=True)
    before = weights(guarded)
    sam3_step(guarded)
    sam3_step(guarded)
    assert guarded.guard.events == 1 and not same(before, weights(guarded))


def test_consecutive_nans_restore_and_back_off(tmp_path):
    t = make_trainer(tmp_path, nan_steps={2, 3})
    sam3_step(t)
    snapshot = weights(t)  # the next good step snapshots these weights (before its own update)
    sam3_step(t)
    with torch.no_grad():  # drift the weights so that a restore is visible
        t.model.weight.add_(1.0)
    sam3_step(t)  # NaN 1: skip
    sam3_step(t)  # NaN 2: restore + LR × 0.5
    assert t.guard.restores == 1 and same(snapshot, weights(t))
    t.optim.step_schedulers(0.5, 4)
    assert t.optim.optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR * 0.5)
    actions = [json.loads(line)["event"]["action"] for line in t.events_path.read_text().splitlines()]
    assert actions == ["skip", "restore"]


def test_too_many_restores_diverge(tmp_path):
    t = make_trainer(tmp_path, nan_steps=set(range(1, 100)), max_restores=1)
    sam3_step(t)
    with pytest.raises(TrainingDiverged) as info:
        for _ in range(10):
            sam3_step(t)
    assert info.value.events == 4 and info.value.step == 4 and info.value.lr == pytest.approx(BASE_LR * 0.5)


def test_no_snapshots_means_diverged_after_k(tmp_path):
    t = make_trainer(tmp_path, nan_steps={1, 2}, snapshot_every=0)
    sam3_step(t)
    sam3_step(t)
    with pytest.raises(TrainingDiverged):
        sam3_step(t)


def test_non_finite_gradient_is_skipped(tmp_path):
    t = make_trainer(tmp_path)
    sam3_step(t)
    handle = t.model.weight.register_hook(lambda g: g * math.inf)
    before = weights(t)
    sam3_step(t)
    handle.remove()
    assert same(before, weights(t)) and t.guard.history[-1].kind == "grad"
    names = {name for name, _, _ in t.logger.logged}
    assert {"train/grad_norm", "train/lr", "train/peak_mem_gb"} <= names


# --- a non-finite matching cost (facebookresearch/sam3 #289, #440) ---------------------------------


def make_detector_trainer(tmp_path, *, poison_steps=(), poison="pred_logits", **guard):
    """A GuardedTrainer whose step runs the model's matcher, as SAM3's forward does, on
    predictions of a tiny 4→5 detector; at ``poison_steps`` ``poison`` becomes NaN."""
    from angioexp.backends.sam3.model import DEFAULT_MATCHER, make_matcher

    t = make_trainer(tmp_path, **guard)
    torch.manual_seed(0)
    t.model = torch.nn.Linear(4, 5 * 3)  # 3 queries × (1 logit + 4 box coordinates)
    t.optim = Optimizer(torch.optim.SGD(t.model.parameters(), lr=BASE_LR), schedulers=[{"lr": lambda where: BASE_LR}])
    t._install_guard()
    matcher = make_matcher(**DEFAULT_MATCHER)
    x = torch.randn(1, 4)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3]])
    targets = {"boxes": boxes, "num_boxes": torch.tensor([1]), "boxes_padded": boxes[None]}

    def step(batch, model, phase):
        k = t.steps[phase]
        t.steps[phase] += 1
        out = model(x).view(1, 3, 5)
        outputs = {"pred_logits": out[..., :1], "pred_boxes": out[..., 1:].sigmoid()}
        if k in poison_steps:
            outputs[poison] = outputs[poison] * math.nan
        _, queries, _ = matcher(outputs, targets)  # (batch, query, target) indices; inside model.forward in SAM3
        loss = (outputs["pred_boxes"][0, queries] - boxes).abs().sum() - outputs["pred_logits"][0, queries].sum()
        return {LOSS_KEY: loss}, 1, {}

    t._step = step
    return t


@pytest.mark.parametrize("poison", ["pred_logits", "pred_boxes"])
def test_sam3_matcher_crashes_on_nan_predictions(poison):
    from sam3.train.matcher import BinaryHungarianMatcherV2

    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3]])
    outputs = {"pred_logits": torch.zeros(1, 3, 1), "pred_boxes": torch.full((1, 3, 4), 0.5)}
    outputs[poison] = outputs[poison] * math.nan
    with pytest.raises(ValueError, match="invalid numeric entries"):  # scipy, inside model.forward
        BinaryHungarianMatcherV2(cost_class=2, cost_bbox=5, cost_giou=2, focal=True)(
            outputs, {"boxes": boxes, "num_boxes": torch.tensor([1]), "boxes_padded": boxes[None]})


@pytest.mark.parametrize("poison", ["pred_logits", "pred_boxes"])
def test_nan_matching_cost_is_a_bad_step_the_guard_recovers_from(tmp_path, poison):
    t = make_detector_trainer(tmp_path, poison_steps={1, 2, 3}, poison=poison, max_consecutive=3)
    snapshot = weights(t)  # the good step snapshots these, before its own update
    sam3_step(t)
    updated = weights(t)
    sam3_step(t)  # NaN in the matcher: skipped, weights untouched
    assert same(updated, weights(t)) and t.guard.events == 1
    event = t.guard.history[-1]
    assert event.kind == "matcher" and event.action == "skip" and f"{poison} entries are non-finite" in event.detail
    sam3_step(t)
    sam3_step(t)  # third in a row: restore the snapshot, LR × 0.5
    assert t.guard.restores == 1 and same(snapshot, weights(t))
    sam3_step(t)  # finite again: training goes on
    assert not same(snapshot, weights(t)) and t.guard.events == 3
    kinds = [json.loads(line)["event"]["kind"] for line in t.events_path.read_text().splitlines()]
    assert kinds == ["matcher"] * 3


def test_degenerate_target_boxes_are_a_named_non_finite_cost():
    """Finite predictions, but a zero-area prediction against a zero-area target: GIoU 0/0."""
    from angioexp.backends.sam3.matcher import GuardedHungarianMatcher, NonFiniteMatchCost

    boxes = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    outputs = {"pred_logits": torch.zeros(1, 2, 1), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.1, 0.1]]])}
    matcher = GuardedHungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, focal=True)
    with pytest.raises(NonFiniteMatchCost, match="angioexp doctor --data"):
        matcher(outputs, {"boxes": boxes, "num_boxes": torch.tensor([1]), "boxes_padded": boxes[None]})
    ok = torch.tensor([[0.5, 0.5, 0.2, 0.2]])  # and a finite cost matches as SAM3's does
    _, queries, _ = matcher(outputs, {"boxes": ok, "num_boxes": torch.tensor([1]), "boxes_padded": ok[None]})
    assert queries.tolist() == [0]  # the box at the target's centre


# --- float16: the GradScaler's own overflows are not divergence --------------------------------------


def fp16_overflow_hook(grad):
    """What float16 does to a scaled gradient: above 65504 it is inf."""
    return torch.where(grad.abs() > 65504, torch.full_like(grad, math.inf), grad)


def test_float16_scaler_overflows_lower_the_scale_instead_of_diverging(tmp_path):
    t = make_trainer(tmp_path, amp_scaler=True)  # GradScaler at its initial 65536
    t.loss_hook = lambda loss, step: loss * 100  # gradients ~10²: scaled past float16's range
    for p in t.model.parameters():
        p.register_hook(fp16_overflow_hook)
    before = weights(t)
    for _ in range(12):
        sam3_step(t)
    scale = t.scaler.get_scale()
    assert scale < 65536 and t.guard.events == 0 and t.amp_overflows >= 2
    assert not same(before, weights(t))  # once the scale fits, steps update the weights
    assert ("train/amp_overflows", float(t.amp_overflows), t.amp_overflows - 1) in t.logger.logged


def test_non_finite_gradient_at_scale_one_is_the_guards(tmp_path):
    t = make_trainer(tmp_path, amp_scaler=True)
    t.scaler._scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    sam3_step(t)
    handle = t.model.weight.register_hook(lambda g: g * math.inf)
    sam3_step(t)
    handle.remove()
    assert t.guard.events == 1 and t.guard.history[-1].kind == "grad" and t.amp_overflows == 0


# --- several GPU processes: the snapshots' host memory ---------------------------------------------


def test_snapshots_are_copied_in_place_not_doubled(tmp_path):
    t = make_trainer(tmp_path, snapshot_every=1)
    t.optim = Optimizer(torch.optim.AdamW(t.model.parameters(), lr=BASE_LR), schedulers=[{"lr": lambda where: BASE_LR}])
    t._install_guard()
    sam3_step(t)  # first snapshot: before AdamW has state
    sam3_step(t)  # AdamW's state appeared: a fresh copy
    buffers = {k: v.data_ptr() for k, v in t.guard._snapshot["model"].items()}
    moments = t.guard._snapshot["optimizer"]["state"][0]["exp_avg"].data_ptr()
    size = t.guard.snapshot_bytes
    model_before = {k: v.clone() for k, v in t.model.state_dict().items()}  # what the next snapshot holds
    adam_before = t.optim.optimizer.state_dict()["state"][0]["exp_avg_sq"].clone()
    sam3_step(t)
    snap = t.guard._snapshot
    assert {k: v.data_ptr() for k, v in snap["model"].items()} == buffers  # the same memory, refilled
    assert snap["optimizer"]["state"][0]["exp_avg"].data_ptr() == moments
    assert all(torch.equal(snap["model"][k], v) for k, v in model_before.items())
    assert torch.equal(snap["optimizer"]["state"][0]["exp_avg_sq"], adam_before)
    assert not torch.equal(t.optim.optimizer.state_dict()["state"][0]["exp_avg_sq"], adam_before)
    assert size == 5 * 4 * 3 + 2 * 4  # 5 parameters × (model + 2 moments), 2 step counters, all fp32
    assert ("train/snapshot_gb", size / 1e9, 2) in t.logger.logged


def test_snapshot_memory_is_bounded_before_the_first_step(tmp_path, monkeypatch):
    import angioexp.backends.sam3.trainer as trainer_module

    t = make_trainer(tmp_path)
    model_bytes = 5 * 4
    adam_bytes = 2 * 5 * 4
    monkeypatch.setenv("WORLD_SIZE", "4")  # four GPU processes on this machine, one snapshot each
    monkeypatch.setattr(trainer_module, "_available_memory_bytes", lambda: int(4 * (model_bytes + adam_bytes) / 0.6) + 1)
    t._check_memory_for_snapshots()  # just fits
    monkeypatch.setattr(trainer_module, "_available_memory_bytes", lambda: 4 * (model_bytes + adam_bytes))
    with pytest.raises(InputError) as info:
        t._check_memory_for_snapshots()
    assert info.value.key == "nan_guard.snapshot_every" and "4 process(es)" in str(info.value)
    t.guard.cfg.snapshot_every = 0  # no snapshots: nothing to bound
    t._check_memory_for_snapshots()


def test_a_restored_snapshot_stays_what_it_was(tmp_path):
    """After a restore on CPU the optimizer must not share the snapshot's buffers, or its next
    steps would rewrite the snapshot that a second restore goes back to."""
    t = make_trainer(tmp_path, nan_steps={2, 3}, snapshot_every=2)
    t.optim = Optimizer(torch.optim.AdamW(t.model.parameters(), lr=BASE_LR), schedulers=[{"lr": lambda where: BASE_LR}])
    t._install_guard()
    sam3_step(t)
    sam3_step(t)  # AdamW state exists: this snapshot holds it
    saved = {k: v.clone() for k, v in t.guard._snapshot["optimizer"]["state"][0].items()}
    sam3_step(t)
    sam3_step(t)  # second NaN in a row: restore
    assert t.guard.restores == 1
    sam3_step(t)  # a good step updates AdamW's moments
    for key, value in t.guard._snapshot["optimizer"]["state"][0].items():
        assert torch.equal(value, saved[key]), key
