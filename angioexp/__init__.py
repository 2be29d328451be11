"""angioexp: MLflow-tracked experiments and Optuna sweeps for SAM3 on coronary angiograms.

Pipeline stages (one sub-package each, in data-flow order):
    data      synthetic angiograms, index.csv validation, COCO conversion, importers, registration
    prompts   text / centreline points / boxes, view angles
    model     the CPU-trainable "core" model with SAM3's heads
    losses    SAM3's matcher and loss terms
    train     the training loop (NaN guard, schedules, checkpoints)
    evaluate  COCO AP, Dice, clDice, Boundary IoU, tolerance-aware AP, label-noise ceiling
    tracking  MLflow runs, datasets, LoggedModels, registry aliases
    sweep     Optuna studies (``python -m angioexp.sweep``)
    backends  the SAM3 trainer backend
    dashboard plotly pages comparing stages, runs and sweeps
"""

__version__ = "0.1.0"
