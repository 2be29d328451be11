"""Post-processing of model outputs before they are scored or written (Stage 2 tree labelling)."""
