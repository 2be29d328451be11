"""Search-space files: every shipped space loads; bad entries are rejected with their key;
sampling honours lo <= hi and conditions (real Optuna studies, in memory)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest

from angioexp.config import load_config
from angioexp.sweep.space import SpaceError, load_space, parse_space

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "sweeps").glob("*.yaml"))

MINIMAL = """
objective: val/AP75_tol
params:
  scratch.lr_scale: {type: float, low: 0.001, high: 1.0, log: true}
"""


def space_of(text: str, tmp_path: Path | None = None):
    return parse_space(textwrap.dedent(text), path=(tmp_path / "space.yaml") if tmp_path else None)


def test_shipped_spaces_load_and_cover_the_researchers_values():
    names = {p.stem for p in SHIPPED}
    assert {"stage1_nan", "stage1_ap75", "stage2", "ci_smoke"} <= names
    for path in SHIPPED:
        space = load_space(path)
        cfg = space.build_config()
        assert cfg.stage == space.stage
    ap75 = load_space(REPO / "sweeps" / "stage1_ap75.yaml")
    by_name = {p.name: p for p in ap75.params}
    mask = by_name["loss.masks.loss_mask"]
    assert mask.low <= 5 and mask.high >= 200  # the seed's 5 and SAM3's 200
    assert by_name["prompts.num_points"].type == "int_range"
    assert by_name["loss.masks.importance_sample_ratio"].when  # a conditional parameter
    # every loss weight of docs/design.md#loss-terms is searched in the AP75 space
    for key in ("loss.boxes.loss_bbox", "loss.boxes.loss_giou", "loss.iabce.loss_ce", "loss.iabce.presence_loss",
                "loss.iabce.pos_weight", "loss.iabce.alpha", "loss.iabce.gamma", "loss.masks.loss_dice",
                "loss.masks.focal_alpha", "loss.masks.focal_gamma", "loss.semantic.loss_semantic_seg",
                "loss.semantic.loss_semantic_dice", "loss.semantic.focal_alpha", "loss.semantic.focal_gamma",
                "prompts.box_chance", "optim.gradient_clip.max_norm", "scratch.lr_scale"):
        assert key in by_name, key
    nan = load_space(REPO / "sweeps" / "stage1_nan.yaml")
    lr = {p.name: p for p in nan.params}["scratch.lr_scale"]
    assert lr.log and lr.low < 0.1 < lr.high
    # its pruner: one successive-halving bracket, one rung half-way, on the semantic head's val Dice
    import optuna

    from angioexp.sweep.cli import build_pruner

    pruner = build_pruner(nan)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner) and nan.pruning_metric == "val/semantic/dice"
    assert pruner._min_resource == nan.build_config().train.max_steps // 2 == 120
    stage2 = load_space(REPO / "sweeps" / "stage2.yaml")
    assert stage2.multi_objective and stage2.sampler.name == "nsga2" and stage2.pruner.name == "none"
    assert stage2.metrics == ["val/segments/dice_common", "val/segments/arcade_mean_f1"]


@pytest.mark.parametrize("per_prompt", [False, True])
def test_stage2_space_searches_the_per_prompt_objective_with_its_own_weights(per_prompt):
    import optuna

    space = load_space(REPO / "sweeps" / "stage2.yaml")
    study = optuna.create_study(directions=space.directions)
    study.enqueue_trial({"loss.per_prompt": per_prompt})
    values = space.suggest(study.ask())
    cfg = space.build_config(values)
    assert cfg.loss.per_prompt is per_prompt and cfg.model.identity_head
    # the per-prompt weights are drawn only when the objective they weigh is trained
    assert ("loss.masks.loss_mask" in values) is per_prompt and ("prompts.positives_per_image" in values) is per_prompt
    assert "loss.identity.loss_identity_ce" in values


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("params:\n  scratch.lr_scal: {type: float, low: 0.1, high: 1}", "params.scratch.lr_scal", "scratch.lr_scale"),
        ("params:\n  scratch.lr_scale: {type: flot, low: 0.1, high: 1}", "params.scratch.lr_scale.type", "float"),
        ("params:\n  scratch.lr_scale: {type: float, low: 2, high: 1}", "params.scratch.lr_scale.low", "above high"),
        ("params:\n  scratch.lr_scale: {type: float, low: 0, high: 1, log: true}", "params.scratch.lr_scale.low", "low > 0"),
        ("params:\n  scratch.lr_scale: {type: float, low: 0.1, hi: 1}", "params.scratch.lr_scale.hi", "high"),
        ("params:\n  scratch.lr_scale: {type: float, low: 0.1, high: abc}", "params.scratch.lr_scale.high", "number"),
        ("params:\n  loss.iabce.alpha: {type: float, low: 0.1, high: 1.5}", "params.loss.iabce.alpha", "[0, 1]"),
        ("params:\n  scratch.resolution: {type: float, low: 64, high: 128}", "params.scratch.resolution.type", "not a float"),
        ("params:\n  prompts.num_points: {type: int, low: 0, high: 3}", "params.prompts.num_points.type", "int_range"),
        ("params:\n  scratch.lr_scale: {type: int_range, low: 0, high: 3}", "params.scratch.lr_scale.type", "int_range"),
        ("params:\n  optim.gradient_clip.max_norm: {type: categorical, choices: []}", "params.optim.gradient_clip.max_norm.choices", "non-empty"),
        ("params:\n  optim.gradient_clip.max_norm: {type: categorical, choices: [0.1, -1.0]}", "params.optim.gradient_clip.max_norm", "> 0"),
        ("params:\n  loss.masks.oversample_ratio: {type: float, low: 1, high: 3, when: {loss.masks.num_sample_points: 256}}",
         "params.loss.masks.oversample_ratio.when.loss.masks.num_sample_points", "not searched above"),
        ("params:\n  loss.masks.num_sample_points: {choices: [null, 256]}\n"
         "  loss.masks.oversample_ratio: {type: float, low: 1, high: 3, when: {loss.masks.num_sample_points: 512}}",
         "params.loss.masks.oversample_ratio.when.loss.masks.num_sample_points", "not one of"),
        ("fixed: {scratch.lr_scale: 0.1}\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "params.scratch.lr_scale", "both searched and fixed"),
        ("fixed: {train.max_stesp: 10}\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "fixed.train.max_stesp", "train.max_steps"),
        ("fixed: {train.max_steps: 0}\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "fixed.train.max_steps", ">= 1"),
        ("objective: val/AP75tol\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "objective.metric", "val/AP75_tol"),
        ("objective: [{metric: val/AP75_tol, direction: up}]\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "objective[0].direction", "maximize"),
        ("objective: [val/AP75_tol, val/cldice]\npruner: median\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "pruner.name", "multi-objective"),
        ("pruner: {name: hyperband, reduction: 3}\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "pruner.reduction", "reduction_factor"),
        ("pruner: {name: successive_halving, max_resource: 240}\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}",
         "pruner.max_resource", "successive_halving"),
        ("pruner: {name: median, metric: val/dcie}\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "pruner.metric", "val/dice"),
        ("pruner: {name: wilcoxon, metric: val/dice}\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "pruner.metric", "per-image Dice"),
        ("pruner: {name: median, metric: train/loss}\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "pruner.metric", "validation metric"),
        ("objective: {metric: train/loss, direction: minimize}\npruner: {name: median, metric: val/dice}\nparams:\n"
         "  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "pruner.metric", "maximised objective"),
        ("sampler: {name: cmaes}\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "sampler.name", "tpe"),
        ("stage: 3\nparams:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "stage", "1 or 2"),
        ("pramas:\n  scratch.lr_scale: {type: float, low: 0.01, high: 1}", "pramas", "params"),
        ("objective: val/AP75_tol", "params", "non-empty"),
    ],
)
def test_bad_space_entries_name_their_key(text, key, fragment):
    with pytest.raises(SpaceError) as info:
        parse_space(text, path=Path("bad.yaml"))
    message = str(info.value)
    assert info.value.key == key, message
    assert fragment in message and "bad.yaml" in message


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(SpaceError, match="not valid YAML"):
        parse_space("params: [unclosed", path=Path("x.yaml"))
    with pytest.raises(SpaceError, match="not found"):
        load_space(tmp_path / "nope.yaml")


def test_yaml_exponent_without_sign_is_a_number():
    space = parse_space("params:\n  scratch.lr_scale: {type: float, low: 1e-3, high: 1.0e2, log: true}")
    assert space.params[0].low == pytest.approx(1e-3) and space.params[0].high == pytest.approx(100.0)


def test_num_points_range_is_ordered_and_conditions_apply():
    space = parse_space(textwrap.dedent("""
        params:
          prompts.num_points: {type: int_range, low: 0, high: 5}
          loss.masks.num_sample_points: {type: categorical, choices: [null, 256]}
          loss.masks.importance_sample_ratio: {type: float, low: 0.5, high: 0.9, when: {loss.masks.num_sample_points: 256}}
        sampler: {name: tpe, seed: 3, n_startup_trials: 5}
        pruner: none
    """))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=3, multivariate=True, group=True))
    seen_active, seen_inactive = 0, 0
    for _ in range(25):
        trial = study.ask()
        values = space.suggest(trial)
        lo, hi = values["prompts.num_points"]
        assert 0 <= lo <= hi <= 5
        if values["loss.masks.num_sample_points"] == 256:
            assert 0.5 <= values["loss.masks.importance_sample_ratio"] <= 0.9
            seen_active += 1
        else:
            assert "loss.masks.importance_sample_ratio" not in values
            seen_inactive += 1
        cfg = space.build_config(values)  # every sampled point is a valid config
        assert list(cfg.prompts.num_points) == [lo, hi]
        assert space.values_from_params(trial.params) == values
        study.tell(trial, float(hi - lo))
    assert seen_active and seen_inactive


def test_base_file_fixed_and_overrides_compose(tmp_path):
    (tmp_path / "base.yaml").write_text("scratch:\n  resolution: 96\ntrain:\n  max_steps: 50\n")
    space = space_of("""
        base: base.yaml
        fixed: {train.max_steps: 7}
        params:
          scratch.lr_scale: {type: float, low: 0.01, high: 1.0, log: true}
    """, tmp_path)
    cfg = space.build_config({"scratch.lr_scale": 0.05}, extra=["train.eval_every=3"])
    assert (cfg.scratch.resolution, cfg.train.max_steps, cfg.train.eval_every) == (96, 7, 3)
    assert cfg.scratch.lr_scale == pytest.approx(0.05)
    # the same overrides through the public loader give the same config
    again = load_config(tmp_path / "base.yaml", space.overrides({"scratch.lr_scale": 0.05}, ["train.eval_every=3"]))
    assert again == cfg
    with pytest.raises(SpaceError, match="base config not found"):
        space_of("base: missing.yaml\n" + MINIMAL, tmp_path)


def test_defaults_follow_the_issue():
    space = parse_space(MINIMAL)
    assert space.metrics == ["val/AP75_tol"] and space.directions == ["maximize"]
    assert space.sampler.name == "tpe" and space.sampler.options["multivariate"] is True
    for metric in ("val/AP75", "val/dice", "val/cldice"):
        assert metric in space.recorded_metrics()
    multi = parse_space("objective: [val/AP75_tol, val/cldice]\n" + MINIMAL.split("\n", 2)[2])
    assert multi.sampler.name == "nsga2" and multi.pruner.name == "none"
