"""The pruning callback against real Optuna pruners: median on the objective metric, Wilcoxon on
the per-image Dice of each evaluation's per_image.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from angioexp.sweep.objective import WILCOXON_STRIDE, PruningCallback, _per_image_dice
from angioexp.train.callbacks import EvalArtifacts


def _per_image_csv(path: Path, dice: list[float]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image_id", "case_id", "dice", "cldice"])
        writer.writeheader()
        # written out of order: the callback pairs images by id, not by row
        for i in reversed(range(len(dice))):
            writer.writerow({"image_id": i + 1, "case_id": f"c{i}", "dice": dice[i], "cldice": 0.5})
    return path


def test_per_image_dice_is_read_in_image_order(tmp_path):
    path = _per_image_csv(tmp_path / "p.csv", [0.1, 0.2, 0.3])
    assert _per_image_dice(path) == [0.1, 0.2, 0.3]
    assert _per_image_dice(tmp_path / "missing.csv") == []


def test_wilcoxon_prunes_a_trial_clearly_worse_on_every_image(tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=2))
    n = 20
    good = [0.8 + 0.005 * i for i in range(n)]
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.8,
                                 intermediate_values={WILCOXON_STRIDE + i: d for i, d in enumerate(good)}))
    trial = study.ask()
    callback = PruningCallback(trial, "val/AP75_tol", per_image=True)
    artifacts = EvalArtifacts(per_image_csv=_per_image_csv(tmp_path / "bad.csv", [d - 0.3 for d in good]))
    with pytest.raises(optuna.TrialPruned, match="pruned at step 40"):
        callback.on_eval_end(40, {"val/AP75_tol": 0.1}, artifacts)
    assert trial.user_attrs["pruned_at_step"] == 40
    frozen = study._storage.get_trial(trial._trial_id)
    assert sorted(frozen.intermediate_values) == [WILCOXON_STRIDE + i for i in range(n)]

    # an equally good trial is not pruned
    other = study.ask()
    PruningCallback(other, "val/AP75_tol", per_image=True).on_eval_end(
        40, {"val/AP75_tol": 0.8}, EvalArtifacts(per_image_csv=_per_image_csv(tmp_path / "ok.csv", good[::-1][::-1])))


def test_median_pruner_sees_the_objective_metric_per_training_step():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for value in (0.5, 0.6):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, intermediate_values={10: value, 20: value}))
    good = study.ask()
    PruningCallback(good, "val/AP75_tol").on_eval_end(10, {"val/AP75_tol": 0.7, "val/dice": 0.1}, EvalArtifacts())
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):  # below the median of the others at step 10
        PruningCallback(trial, "val/AP75_tol").on_eval_end(10, {"val/AP75_tol": 0.05, "val/dice": 0.9}, EvalArtifacts())
    assert study._storage.get_trial(trial._trial_id).intermediate_values == {10: 0.05}
    # a NaN metric is not reported (the pruner would otherwise compare garbage)
    fresh = study.ask()
    PruningCallback(fresh, "val/AP75_tol").on_eval_end(10, {"val/AP75_tol": float("nan")}, EvalArtifacts())
    assert study._storage.get_trial(fresh._trial_id).intermediate_values == {}
