"""Search-space files (``sweeps/*.yaml``): parsing, validation, sampling, trial configs.

A space file names angioexp config keys (``angioexp.config.all_keys()``) and how to search
them; everything else about a trial comes from the base config + ``fixed`` overrides::

    study: stage1_nan                 # default study name (--study overrides)
    stage: 1
    backend: core                     # core | sam3 (--backend overrides)
    base: null                        # optional base config YAML, relative to this file
    fixed: {train.max_steps: 150}     # overrides applied to every trial
    objective:                        # one entry → TPE, several → NSGA-II + Pareto front
      - {metric: val/AP75_tol, direction: maximize}
    objective_from: final             # final | best evaluation of the run
    sampler: {name: tpe, seed: 0, multivariate: true, n_startup_trials: 4}
    pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 50}  # + metric: val/dice (default: the objective)
                                      # median | successive_halving | hyperband | wilcoxon | none
    params:
      scratch.lr_scale:      {type: float, low: 1.0e-3, high: 1.0, log: true}
      prompts.num_points:    {type: int_range, low: 0, high: 6}      # [lo, hi], lo <= hi
      loss.masks.num_sample_points: {type: categorical, choices: [null, 4096]}
      loss.masks.importance_sample_ratio:                            # conditional parameter
        {type: float, low: 0.5, high: 0.95, when: {loss.masks.num_sample_points: 4096}}

Every error names the file and the offending key (``params.scratch.lr_scal: unknown config key
(did you mean 'scratch.lr_scale'?)``). Every range end and choice is checked against the config's
own validation before any trial runs, so a sweep can't discover a bad range at trial 9.
"""

from __future__ import annotations

import copy
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from angioexp.config import Config, ConfigError, _suggest, all_keys, load_config, set_value, validate
from angioexp.errors import InputError
from angioexp.segments import SEGMENTS

DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "nsga2", "random")
PRUNERS = ("median", "successive_halving", "hyperband", "wilcoxon", "none")
PARAM_TYPES = ("float", "int", "categorical", "int_range")
TOP_LEVEL_KEYS = (
    "description", "study", "stage", "backend", "base", "fixed", "objective", "objective_from",
    "record", "sampler", "pruner", "params",
)
# Metrics every trial records (user attrs + MLflow), whatever the objective.
ALWAYS_RECORDED = ("val/AP75_tol", "val/AP75", "val/AP50", "val/AP", "val/dice", "val/cldice")

_BASE_METRICS = ("AP", "AP50", "AP75", "AP_tol", "AP75_tol", "dice", "cldice", "biou")
_PER_SEGMENT = ("AP75", "dice")
KNOWN_METRICS: tuple[str, ...] = tuple(f"val/{m}" for m in _BASE_METRICS) + tuple(
    f"val/{m}/{s.slug}" for m in _PER_SEGMENT for s in SEGMENTS
) + ("val/dice_mean_segments", "val/semantic/dice", "val/semantic/cldice", "val/semantic/dice_mean_segments", "train/loss") + tuple(
    f"val/segments/{m}" for m in ("dice_common", "dice_common_ungated", "dice_all", "arcade_mean_f1")  # Stage 2, docs/stage2.md
)


class SpaceError(InputError):
    """A bad search-space file; names the file and the key."""


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # maximize | minimize


@dataclass(frozen=True)
class ParamSpec:
    """One searched config key.

    ``name`` is the config key; an ``int_range`` key is searched as two Optuna parameters,
    ``<key>.lo`` and ``<key>.hi`` (hi drawn in [lo, high], so lo <= hi always holds).
    """

    name: str
    type: str  # float | int | categorical | int_range
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    when: dict[str, tuple] = field(default_factory=dict)  # parent key → allowed values

    def active(self, sampled: dict[str, Any]) -> bool:
        """True when every ``when`` condition holds for the values sampled so far."""
        return all(key in sampled and _in(sampled[key], allowed) for key, allowed in self.when.items())


@dataclass(frozen=True)
class SamplerSpec:
    name: str = "tpe"
    seed: int | None = 0
    options: dict = field(default_factory=dict)  # extra keyword arguments for the sampler


@dataclass(frozen=True)
class PrunerSpec:
    name: str = "median"
    options: dict = field(default_factory=dict)  # the Optuna pruner's own keyword arguments
    # What the pruner compares at each evaluation (None: the objective). A metric that moves
    # early (val Dice) lets a pruner rank trials whose objective (tolerant AP75) is still 0 for
    # all of them — ties at 0 are never pruned.
    metric: str | None = None


@dataclass(frozen=True)
class SearchSpace:
    path: Path | None
    text: str  # the YAML as written (stored in the study so export/report need only storage)
    study: str
    stage: int
    backend: str
    base: Path | None
    fixed: dict[str, Any]
    objectives: tuple[Objective, ...]
    objective_from: str  # final | best
    record: tuple[str, ...]
    sampler: SamplerSpec
    pruner: PrunerSpec
    params: tuple[ParamSpec, ...]
    description: str = ""

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def pruning_metric(self) -> str:
        """The metric the pruner compares after each evaluation (``pruner.metric`` or the objective)."""
        return self.pruner.metric or self.metrics[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def recorded_metrics(self) -> list[str]:
        out = list(self.metrics)
        for m in (*ALWAYS_RECORDED, *self.record):
            if m not in out:
                out.append(m)
        return out

    # -- trials ----------------------------------------------------------------------------

    def suggest(self, trial) -> dict[str, Any]:
        """Sample every active parameter on an Optuna trial → {config key: value}.

        Define-by-run in file order, so a conditional parameter sees its parent's value.
        """
        values: dict[str, Any] = {}
        for p in self.params:
            if not p.active(values):
                continue
            if p.type == "float":
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
            elif p.type == "int":
                values[p.name] = trial.suggest_int(p.name, p.low, p.high, log=p.log, step=p.step or 1)
            elif p.type == "categorical":
                values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            else:  # int_range: hi's range depends on lo, so lo <= hi by construction
                lo = trial.suggest_int(f"{p.name}.lo", p.low, p.high)
                hi = trial.suggest_int(f"{p.name}.hi", lo, p.high)
                values[p.name] = [lo, hi]
        return values

    def values_from_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Optuna ``trial.params`` (as stored) → {config key: value}; inverse of :meth:`suggest`."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.type == "int_range":
                if f"{p.name}.lo" in params:
                    values[p.name] = [int(params[f"{p.name}.lo"]), int(params[f"{p.name}.hi"])]
            elif p.name in params:
                values[p.name] = params[p.name]
        return values

    def overrides(self, values: dict[str, Any] | None = None, extra: list[str] | None = None) -> list[str]:
        """``key=value`` overrides (fixed, then sampled, then ``extra``) for ``load_config``."""
        out = [f"{k}={json.dumps(v)}" for k, v in self.fixed.items()]
        out += [f"{k}={json.dumps(v)}" for k, v in (values or {}).items()]
        return out + list(extra or [])

    def build_config(self, values: dict[str, Any] | None = None, *, extra: list[str] | None = None,
                     backend: str | None = None) -> Config:
        """The config a trial trains with: base file ← fixed ← sampled values ← extra overrides."""
        return load_config(self.base, self.overrides(values, extra), stage=self.stage, backend=backend or self.backend)


# ---------------------------------------------------------------------------------------------
# Parsing


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SpaceError("search-space file not found", file=path)
    text = path.read_text(encoding="utf-8")
    return parse_space(text, path=path)


def parse_space(text: str, *, path: Path | None = None) -> SearchSpace:
    src = str(path) if path else "<space>"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpaceError(f"not valid YAML: {exc}", file=src) from None
    if not isinstance(data, dict):
        raise SpaceError("expected a mapping at the top level", file=src)

    def fail(key: str, message: str) -> SpaceError:
        return SpaceError(message, file=src, key=key)

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise fail(str(key), f"unknown top-level key{_suggest(str(key), TOP_LEVEL_KEYS)}")

    stage = data.get("stage", 1)
    if stage not in (1, 2):
        raise fail("stage", f"must be 1 or 2, got {stage!r}")
    backend = data.get("backend", "core")
    if backend not in ("core", "sam3"):
        raise fail("backend", f"must be core or sam3, got {backend!r}")
    study = data.get("study") or (path.stem if path else "sweep")
    if not isinstance(study, str) or not study.strip():
        raise fail("study", f"must be a non-empty string, got {study!r}")

    base = data.get("base")
    base_path = None
    if base is not None:
        base_path = (path.parent / str(base)) if path and not Path(str(base)).is_absolute() else Path(str(base))
        if not base_path.is_file():
            raise fail("base", f"base config not found: {base_path}")

    keys = all_keys()
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise fail("fixed", "must be a mapping of config key → value")
    for key in fixed:
        if key not in keys:
            raise fail(f"fixed.{key}", f"unknown config key{_suggest(str(key), keys)}")

    objectives = _parse_objectives(data.get("objective", "val/AP75_tol"), fail)
    objective_from = data.get("objective_from", "final")
    if objective_from not in ("final", "best"):
        raise fail("objective_from", f"must be 'final' or 'best', got {objective_from!r}")
    record = data.get("record") or []
    if not isinstance(record, list):
        raise fail("record", "must be a list of metric names")
    for i, m in enumerate(record):
        _check_metric(str(m), f"record[{i}]", fail)

    sampler = _parse_sampler(data.get("sampler"), multi=len(objectives) > 1, fail=fail)
    pruner = _parse_pruner(data.get("pruner"), multi=len(objectives) > 1, fail=fail)
    if pruner.metric is not None and objectives[0].direction != "maximize" and pruner.metric != objectives[0].metric:
        # Optuna prunes in the study's direction; every other known metric is higher-is-better.
        raise fail("pruner.metric", "a pruning metric other than the objective needs a maximised objective")

    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise fail("params", "must be a non-empty mapping of config key → search spec")
    params: list[ParamSpec] = []
    for name, spec in raw_params.items():
        params.append(_parse_param(str(name), spec, keys, params, fail))
        if name in fixed:
            raise fail(f"params.{name}", "is both searched and fixed; remove it from one of them")

    space = SearchSpace(
        path=path, text=text, study=study.strip(), stage=int(stage), backend=backend, base=base_path,
        fixed=dict(fixed), objectives=objectives, objective_from=objective_from,
        record=tuple(str(m) for m in record), sampler=sampler, pruner=pruner, params=tuple(params),
        description=str(data.get("description") or "").strip(),
    )
    _check_against_config(space, fail)
    return space


def _parse_objectives(raw, fail) -> tuple[Objective, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise fail("objective", "needs at least one metric")
    out = []
    for i, item in enumerate(items):
        key = f"objective[{i}]" if isinstance(raw, list) else "objective"
        if isinstance(item, str):
            item = {"metric": item}
        if not isinstance(item, dict):
            raise fail(key, f"expected a metric name or {{metric, direction}}, got {item!r}")
        for k in item:
            if k not in ("metric", "direction"):
                raise fail(f"{key}.{k}", f"unknown key{_suggest(str(k), ('metric', 'direction'))}")
        metric = str(item.get("metric", ""))
        _check_metric(metric, f"{key}.metric", fail)
        direction = item.get("direction", "maximize")
        if direction not in DIRECTIONS:
            raise fail(f"{key}.direction", f"must be maximize or minimize, got {direction!r}")
        out.append(Objective(metric, direction))
    if len({o.metric for o in out}) != len(out):
        raise fail("objective", "the same metric appears twice")
    return tuple(out)


def _check_metric(metric: str, key: str, fail) -> None:
    if metric not in KNOWN_METRICS:
        raise fail(key, f"unknown metric {metric!r}{_suggest(metric, KNOWN_METRICS)}")


def _parse_sampler(raw, *, multi: bool, fail) -> SamplerSpec:
    raw = dict(raw or {})
    name = raw.pop("name", "nsga2" if multi else "tpe")
    if name not in SAMPLERS:
        raise fail("sampler.name", f"must be one of {', '.join(SAMPLERS)}{_suggest(str(name), SAMPLERS)}")
    seed = raw.pop("seed", 0)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise fail("sampler.seed", f"must be an integer or null, got {seed!r}")
    allowed = {
        "tpe": ("multivariate", "group", "n_startup_trials", "n_ei_candidates", "constant_liar"),
        "nsga2": ("population_size", "mutation_prob", "crossover_prob", "swapping_prob"),
        "random": (),
    }[name]
    for k in raw:
        if k not in allowed:
            raise fail(f"sampler.{k}", f"not an option of the {name} sampler{_suggest(str(k), allowed)}")
    if name == "tpe":
        raw.setdefault("multivariate", True)
        # Conditional parameters need the group decomposition to stay multivariate.
        raw.setdefault("group", True)
        # Several workers asking at once would otherwise get near-identical suggestions.
        raw.setdefault("constant_liar", True)
    return SamplerSpec(name=name, seed=seed, options=raw)


def _parse_pruner(raw, *, multi: bool, fail) -> PrunerSpec:
    if isinstance(raw, str):
        raw = {"name": raw}
    raw = dict(raw or {})
    name = raw.pop("name", "none" if multi else "median")
    metric = raw.pop("metric", None)
    if name not in PRUNERS:
        raise fail("pruner.name", f"must be one of {', '.join(PRUNERS)}{_suggest(str(name), PRUNERS)}")
    if multi and name != "none":
        raise fail("pruner.name", "Optuna cannot prune multi-objective studies (Trial.report is single-objective); use 'none'")
    allowed = {
        "median": ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
        "successive_halving": ("min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count"),
        "hyperband": ("min_resource", "max_resource", "reduction_factor", "bootstrap_count"),
        "wilcoxon": ("p_threshold", "n_startup_steps"),
        "none": (),
    }[name]
    for k in raw:
        if k not in allowed:
            raise fail(f"pruner.{k}", f"not an option of the {name} pruner{_suggest(str(k), allowed + ('metric',))}")
    if metric is not None:
        if name in ("wilcoxon", "none"):
            raise fail("pruner.metric", f"the {name} pruner takes no metric (wilcoxon compares per-image Dice)")
        metric = str(metric)
        _check_metric(metric, "pruner.metric", fail)
        if metric == "train/loss":
            raise fail("pruner.metric", "must be a validation metric (pruning happens after evaluations)")
    return PrunerSpec(name=name, options=raw, metric=metric)


def _base_types(tp) -> tuple[list, bool]:
    """Declared config type → (non-None member types, accepts None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def _parse_param(name: str, spec, keys: dict, previous: list[ParamSpec], fail) -> ParamSpec:
    key = f"params.{name}"
    if name not in keys:
        raise fail(key, f"unknown config key{_suggest(name, keys)}")
    if not isinstance(spec, dict):
        raise fail(key, f"expected a mapping like {{type: float, low: ..., high: ...}}, got {spec!r}")
    spec = dict(spec)
    ptype = spec.pop("type", "categorical" if "choices" in spec else None)
    if ptype not in PARAM_TYPES:
        raise fail(f"{key}.type", f"must be one of {', '.join(PARAM_TYPES)}, got {ptype!r}")
    allowed = {
        "float": ("low", "high", "log", "step", "when"),
        "int": ("low", "high", "log", "step", "when"),
        "categorical": ("choices", "when"),
        "int_range": ("low", "high", "when"),
    }[ptype]
    for k in spec:
        if k not in allowed:
            raise fail(f"{key}.{k}", f"not an option of a {ptype} parameter{_suggest(str(k), allowed)}")

    declared, nullable = _base_types(keys[name])
    is_pair = any(typing.get_origin(t) is tuple for t in declared)
    numeric = [t for t in declared if t in (int, float)]
    if ptype == "int_range" and not is_pair:
        raise fail(f"{key}.type", f"int_range is for [lo, hi] keys like prompts.num_points; {name} is {keys[name]}")
    if is_pair and ptype != "int_range":
        raise fail(f"{key}.type", f"{name} is a [lo, hi] pair: use type int_range")
    if ptype == "float" and float not in numeric:
        raise fail(f"{key}.type", f"{name} is {_type_name(keys[name])}, not a float")
    if ptype == "int" and int not in numeric:
        raise fail(f"{key}.type", f"{name} is {_type_name(keys[name])}, not an integer (use type float or categorical)")

    when = _parse_when(spec.pop("when", None), key, previous, fail)
    if ptype == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"{key}.choices", "must be a non-empty list")
        if numeric:  # PyYAML reads 1.0e6 as text; a numeric key wants the number
            choices = [_number_or_text(c) for c in choices]
        if len({json.dumps(c, sort_keys=True) for c in choices}) != len(choices):
            raise fail(f"{key}.choices", "has duplicates")
        for c in choices:
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise fail(f"{key}.choices", f"choices must be numbers, strings, booleans or null, got {c!r}")
        return ParamSpec(name, "categorical", choices=tuple(choices), when=when)

    # PyYAML reads 1e-3 / 1.0e6 (no sign, or no dot) as text: accept such numbers.
    low, high = _number_or_text(spec.get("low")), _number_or_text(spec.get("high"))
    step = _number_or_text(spec.get("step"))
    for which, value in (("low", low), ("high", high)):
        if not _is_number(value):
            raise fail(f"{key}.{which}", f"must be a number, got {value!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise fail(f"{key}.log", f"must be true or false, got {log!r}")
    if ptype in ("int", "int_range"):
        for which, value in (("low", low), ("high", high)):
            if not float(value).is_integer():
                raise fail(f"{key}.{which}", f"must be an integer, got {value!r}")
        low, high = int(low), int(high)
    else:
        low, high = float(low), float(high)
    if low > high:
        raise fail(f"{key}.low", f"low {low} is above high {high}")
    if log and low <= 0:
        raise fail(f"{key}.low", f"a log-scaled range needs low > 0, got {low}")
    if step is not None:
        if not _is_number(step) or step <= 0:
            raise fail(f"{key}.step", f"must be a positive number, got {step!r}")
        if log:
            raise fail(f"{key}.step", "step and log cannot be combined (Optuna restriction)")
        if ptype == "int" and not float(step).is_integer():
            raise fail(f"{key}.step", f"must be an integer for an int parameter, got {step!r}")
    if ptype == "int_range" and low < 0:
        raise fail(f"{key}.low", f"must be >= 0, got {low}")
    return ParamSpec(name, ptype, low=low, high=high, log=log, step=step, when=when)


def _parse_when(raw, key: str, previous: list[ParamSpec], fail) -> dict[str, tuple]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise fail(f"{key}.when", "must be a mapping {earlier param: value or [values]}")
    by_name = {p.name: p for p in previous}
    out = {}
    for parent, allowed in raw.items():
        if parent not in by_name:
            raise fail(
                f"{key}.when.{parent}",
                f"condition on a parameter that is not searched above this one{_suggest(str(parent), by_name) if by_name else ''}",
            )
        p = by_name[parent]
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if p.type == "categorical":
            for v in values:
                if not _in(v, p.choices):
                    raise fail(f"{key}.when.{parent}", f"{v!r} is not one of {parent}'s choices {list(p.choices)}")
        elif p.type != "int":
            raise fail(f"{key}.when.{parent}", "conditions may only test categorical or int parameters")
        out[str(parent)] = values
    return out


def _check_against_config(space: SearchSpace, fail) -> None:
    """Build the fixed config once and push every range end / choice through config validation."""
    src = str(space.path) if space.path else "<space>"
    try:
        base = space.build_config()
    except ConfigError as exc:
        key = exc.key or "fixed"
        raise SpaceError(f"the fixed settings do not form a valid config: {exc.reason}", file=src,
                         key=f"fixed.{key}" if exc.key in space.fixed else key) from None
    for p in space.params:
        if p.type == "categorical":
            probes = list(p.choices)
        elif p.type == "int_range":
            probes = [[p.low, p.low], [p.high, p.high]]
        else:
            probes = [p.low, p.high]
        for value in probes:
            cfg = copy.deepcopy(base)
            try:
                set_value(cfg, p.name, value)
                validate(cfg)
            except ConfigError as exc:
                raise fail(f"params.{p.name}", f"value {value!r} is not valid for {p.name}: {exc.reason}") from None


def _number_or_text(value):
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _in(value, allowed) -> bool:
    """Membership with YAML's types kept apart: ``true`` does not match ``1``, null only null."""
    for a in allowed:
        if value is None or a is None:
            if value is a:
                return True
        elif isinstance(value, bool) or isinstance(a, bool):
            if isinstance(value, bool) and isinstance(a, bool) and value == a:
                return True
        elif value == a:
            return True
    return False


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def space_from_study(study) -> SearchSpace:
    """The space a study was created with (stored in its user attrs by the sweep launcher)."""
    text = study.user_attrs.get("angioexp.space")
    if not text:
        raise InputError(f"study '{study.study_name}' was not created by angioexp sweep (no stored search space)")
    stored_path = study.user_attrs.get("angioexp.space_path")
    return parse_space(text, path=Path(stored_path) if stored_path else None)
