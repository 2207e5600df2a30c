"""Class activation maps in pure torch: no Lightning here, so they are tested alone (METHOD §5).

:class:`CAMModel` is stage 1 of image-level supervision: a multi-label classifier whose class
activation maps become pseudo labels (:func:`normalize_cams`, :func:`cam_pseudo_labels`). The
Lightning task that trains it and writes the labels is
:class:`agmm_lightning.tasks.cam.CAMClassifier`.
"""

from agmm_lightning.cam.model import CAMModel, cam_pseudo_labels, check_cam_options, normalize_cams

__all__ = ["CAMModel", "cam_pseudo_labels", "check_cam_options", "normalize_cams"]
