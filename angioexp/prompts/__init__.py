"""Prompts for a find query: centreline points (``points``), boxes (``boxes``), both together
as SAM3's RandomGeometricInputsAPI (``geometric``), and C-arm view classes (``views``)."""

from angioexp.prompts.boxes import box_from_mask, cxcywh_normalised_from_mask, jitter_box, sample_box_prompt
from angioexp.prompts.geometric import GeometricPrompt, sample_geometric_prompt
from angioexp.prompts.points import PointPrompt, centered_points, centreline_points, sample_points
from angioexp.prompts.views import NUM_VIEWS, UNKNOWN_VIEW, VIEW_CLASSES, view_class, view_name

__all__ = [
    "GeometricPrompt",
    "NUM_VIEWS",
    "PointPrompt",
    "UNKNOWN_VIEW",
    "VIEW_CLASSES",
    "box_from_mask",
    "centered_points",
    "centreline_points",
    "cxcywh_normalised_from_mask",
    "jitter_box",
    "sample_box_prompt",
    "sample_geometric_prompt",
    "sample_points",
    "view_class",
    "view_name",
]
