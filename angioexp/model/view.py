"""The C-arm view as a categorical variable for the model: the class of
:func:`angioexp.prompts.views.view_class` (one source of truth for the bins), with "unknown"
mapped to an extra index ``num_views`` (the view token's last embedding row). The auxiliary view
head's labels use −1 for unknown instead (ignored by the loss)."""

from __future__ import annotations

from angioexp.prompts.views import NUM_VIEWS, UNKNOWN_VIEW, view_class


def num_view_classes() -> int:
    return NUM_VIEWS


def view_index(primary, secondary, num_views: int) -> int:
    """Angles in degrees (None/NaN allowed) → class index in [0, num_views]; num_views = unknown."""
    index = view_class(primary, secondary)
    return num_views if index == UNKNOWN_VIEW or index >= num_views else index
