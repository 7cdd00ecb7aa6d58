"""Pictures of what a diagnosis found and what treatment changed, gathered in report.html."""

from .gradmaps import spatial_gradient_maps
from .plots import jaccard_matrix
from .render import render_report

__all__ = ["jaccard_matrix", "render_report", "spatial_gradient_maps"]
