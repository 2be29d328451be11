"""Comparison dashboards (issue 7): static plotly pages built from the MLflow tracking store and
Optuna storage — Registry, Runs, Sweeps, Predictions and an overview — also logged as artifacts
of a ``dashboard`` run.

    from angioexp.dashboard import DashboardOptions, build_dashboards
    result = build_dashboards(DashboardOptions(out=Path("dashboards")))

Command line: ``angioexp dashboard`` (:mod:`angioexp.dashboard.cli`); MLproject entry point
``dashboard``.
"""

from __future__ import annotations

from angioexp.dashboard.build import DashboardOptions, DashboardResult, build_dashboards

__all__ = ["DashboardOptions", "DashboardResult", "build_dashboards"]
