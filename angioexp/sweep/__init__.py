"""Optuna sweeps over the angioexp config (issue 5).

``space`` (search-space YAML) → ``objective`` (one training run per trial, NaN-aware pruning) →
``workers`` (ask/tell loop, exact trial budget, K local processes) on ``storage`` (SQLite,
journal file, PostgreSQL; heartbeats + retry) with ``tracking`` (MLflow parent/nested runs,
best model registered) and ``report`` (plotly HTML). Entry: ``python -m angioexp.sweep``.
"""
