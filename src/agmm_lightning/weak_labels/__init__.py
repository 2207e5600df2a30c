"""Weak labels, pure NumPy: their forms, simulation from dense masks, and rasterisation.

No dataset names here: the parsers of distributed formats live with their datasets in
:mod:`agmm_lightning.data`.
"""

from agmm_lightning.weak_labels.forms import (
    SimulationOptions,
    WeakLabel,
    WeakLabelForm,
    WeakLabelOption,
    assign_forms,
    check_form,
    form_mix,
    simulate_weak_label,
    weak_label_rng,
)
from agmm_lightning.weak_labels.rasterize import (
    points_from_target,
    rasterize_boxes,
    rasterize_points,
    rasterize_polylines,
    tags_from_mask,
    tags_from_target,
)
from agmm_lightning.weak_labels.simulate import (
    boxes_from_mask,
    sample_points,
    simulate_blocks,
    simulate_scribbles,
)

__all__ = [
    "SimulationOptions",
    "WeakLabel",
    "WeakLabelForm",
    "WeakLabelOption",
    "assign_forms",
    "boxes_from_mask",
    "check_form",
    "form_mix",
    "points_from_target",
    "rasterize_boxes",
    "rasterize_points",
    "rasterize_polylines",
    "sample_points",
    "simulate_blocks",
    "simulate_scribbles",
    "simulate_weak_label",
    "tags_from_mask",
    "tags_from_target",
    "weak_label_rng",
]
