"""Weak labels, pure NumPy: their forms, simulation from dense masks, and rasterisation.

No dataset names here: the parsers of distributed formats live with their datasets in
:mod:`agmm_lightning.data`.

The package exports what its modules export: each module's ``__all__`` is the one list of its
public names.
"""

from agmm_lightning.weak_labels import forms, rasterize, simulate
from agmm_lightning.weak_labels.forms import *  # noqa: F403
from agmm_lightning.weak_labels.rasterize import *  # noqa: F403
from agmm_lightning.weak_labels.simulate import *  # noqa: F403

__all__ = forms.__all__ + rasterize.__all__ + simulate.__all__
