"""NaN/Inf guard shared by both training backends.

Semantics (the same in ``core`` and ``sam3``):

* a step whose loss or gradient norm is not finite is **skipped** (no optimizer step) and
  counted as an event; so is a step whose finite loss has **exploded** past
  ``max_loss_ratio`` × the run's initial loss (its first finite loss: the loss before any update,
  which later steps of a fast-diverging run cannot contaminate). In fp32 a diverging run need
  not overflow at all (loss ×10⁴–10⁶ and gradient norms 10¹³ for as long as it runs, learning
  nothing). Healthy runs stay within ~2× of their initial loss (every run on record), so the
  default ratio of 100 leaves a wide margin;
* after ``max_consecutive`` bad steps in a row the model and optimizer are **restored** to the
  last good snapshot and every learning rate is multiplied by ``lr_backoff`` (the backoff
  compounds: ``lr_factor = lr_backoff ** restores``);
* after ``max_restores`` restores the run is declared diverged: :class:`TrainingDiverged`
  carries the step, the LR in force and the event history, so a sweep can prune the trial with
  that record instead of scoring garbage.

Under DDP every rank must take the same decision, so finiteness is all-reduced first.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch

from angioexp.config import NanGuardConfig
from angioexp.errors import TrainingDiverged

log = logging.getLogger(__name__)


def _max_over_ranks(value: float, device: torch.device | None = None) -> float:
    """``value``'s maximum over all ranks (``value`` itself outside DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], device=device or torch.device("cpu"))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def _all_ranks_true(flag: bool, device: torch.device | None = None) -> bool:
    return _max_over_ranks(0.0 if flag else 1.0, device) == 0.0


def is_finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all().item())
    return math.isfinite(float(value))


@dataclass
class NanEvent:
    step: int
    kind: str  # "loss" (non-finite) | "explosion" (finite, past max_loss_ratio) | "grad"
    lr: float  # learning rate (first param group) in force at the bad step
    action: str  # "skip" | "restore"
    detail: str = ""


@dataclass
class NanGuard:
    cfg: NanGuardConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    events: int = 0
    consecutive: int = 0
    restores: int = 0
    history: list[NanEvent] = field(default_factory=list)
    _snapshot: dict | None = None
    _good_steps: int = 0
    reference_loss: float | None = None  # the run's first finite loss

    @property
    def lr_factor(self) -> float:
        """Multiply the scheduled LR by this (compounded backoff after restores)."""
        return self.cfg.lr_backoff**self.restores

    def finite(self, value, device: torch.device | None = None) -> bool:
        """True when ``value`` is finite on every rank."""
        return _all_ranks_true(is_finite(value), device)

    def check_loss(self, loss, device: torch.device | None = None) -> tuple[str, str] | None:
        """None when ``loss`` may be stepped on (on every rank), else ``(kind, detail)`` for
        :meth:`bad_step`: ``("loss", ...)`` non-finite, ``("explosion", ...)`` past the ratio."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        finite = math.isfinite(value)
        ratio = self.cfg.max_loss_ratio
        exploded = finite and bool(ratio) and self.reference_loss is not None and value > ratio * self.reference_loss
        # one collective per step: 2 = non-finite somewhere, 1 = exploded somewhere, 0 = fine
        worst = _max_over_ranks(0.0 if finite and not exploded else (1.0 if finite else 2.0), device)
        if worst == 2.0:
            return "loss", f"non-finite loss {value}" if not finite else "non-finite loss on another rank"
        if worst == 1.0:
            return "explosion", (f"loss {value:.4g} > {ratio:g} × initial loss {self.reference_loss:.4g} "
                                 "(nan_guard.max_loss_ratio)" if exploded else "loss exploded on another rank")
        if self.reference_loss is None:
            # floor: a loss of ~0 would make every fluctuation an "explosion"
            self.reference_loss = max(value, 1e-3)
        return None

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer.param_groups else float("nan")

    def good_step(self, step: int) -> None:
        """Call after a successful optimizer step."""
        self.consecutive = 0
        self._good_steps += 1
        if self._snapshot is None or self._good_steps % max(1, self.cfg.snapshot_every) == 0:
            self.snapshot(step)

    def snapshot(self, step: int) -> None:
        self._snapshot = {
            "step": step,
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(_to_cpu(self.optimizer.state_dict())),
        }

    def bad_step(self, step: int, kind: str, detail: str = "") -> NanEvent:
        """Record a non-finite loss/gradient. Returns the event; raises TrainingDiverged when giving up."""
        self.events += 1
        self.consecutive += 1
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.current_lr()
        action = "skip"
        if self.consecutive >= self.cfg.max_consecutive:
            if self.restores >= self.cfg.max_restores or self._snapshot is None:
                event = NanEvent(step, kind, lr, "diverged", detail)
                self.history.append(event)
                raise TrainingDiverged(
                    f"training diverged at step {step}: {self.events} non-finite steps, "
                    f"{self.restores} restores, lr {lr:.3g}",
                    step=step, lr=lr, events=self.events, history=[e.__dict__ for e in self.history],
                )
            self.restore()
            action = "restore"
        event = NanEvent(step, kind, lr, action, detail)
        self.history.append(event)
        log.warning(
            "non-finite %s at step %d (lr %.3g): %s; events=%d consecutive=%d restores=%d%s",
            kind, step, lr, action, self.events, self.consecutive, self.restores,
            f" ({detail})" if detail else "",
        )
        if action == "restore":
            self.consecutive = 0
        return event

    def restore(self) -> None:
        assert self._snapshot is not None
        self.model.load_state_dict(self._snapshot["model"])  # copies into the parameters
        # Optimizer.load_state_dict keeps the given tensors when device and dtype already match: hand
        # it a copy, or the next step's in-place updates would rewrite the snapshot itself
        self.optimizer.load_state_dict(copy.deepcopy(self._snapshot["optimizer"]))
        self.restores += 1

    def metrics(self) -> dict[str, float]:
        return {
            "train/nan_events": float(self.events),
            "train/nan_restores": float(self.restores),
            "train/lr_factor": float(self.lr_factor),
        }

    def state_dict(self) -> dict:
        return {"events": self.events, "restores": self.restores, "consecutive": self.consecutive,
                "reference_loss": self.reference_loss}

    def load_state_dict(self, state: dict) -> None:
        self.events = int(state.get("events", 0))
        self.restores = int(state.get("restores", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.reference_loss = state.get("reference_loss")


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
