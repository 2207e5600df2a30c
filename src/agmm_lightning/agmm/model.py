"""AGMMModel: a segmentation network and the losses of one method, in pure torch.

The network is any segmentation-models-pytorch encoder-decoder. In OEM mode the model also holds
the embedding head and the class mixtures; their refit is left to the caller (the Lightning task
sums the statistics across ranks first). :func:`build_network` builds that network by name; it
lives in :mod:`agmm_lightning.encoders`, the one builder of encoders and their weights.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import segmentation_models_pytorch as smp
import torch.nn.functional as F
from torch import Tensor, nn

from agmm_lightning.agmm.bands import Fused, fused_pixel_terms
from agmm_lightning.agmm.cvpr import cvpr_agmm_losses
from agmm_lightning.agmm.losses import partial_cross_entropy
from agmm_lightning.agmm.mixtures import ClassMixtures
from agmm_lightning.agmm.oem import OEMOptions, StepLosses, oem_losses
from agmm_lightning.agmm.precision import float32_math
from agmm_lightning.encoders import build_network, check_encoder
from agmm_lightning.errors import InputError, check_choice
from agmm_lightning.targets import check_target

# build_network and check_encoder live in encoders.py (shared with the CAM model); re-exported
# here, where the network's users have always imported them.
__all__ = ["AGMMModel", "METHODS", "Method", "build_network", "check_encoder"]

Method = Literal["agmm", "cvpr", "baseline"]
METHODS: tuple[Method, ...] = ("agmm", "cvpr", "baseline")


class AGMMModel(nn.Module):
    """A segmentation network trained from weak labels with one method's losses.

    Args:
        network: The smp encoder-decoder.
        num_classes: Number of classes C.
        method: ``"agmm"`` (OEM mode, METHOD §3), ``"cvpr"`` (METHOD §2) or ``"baseline"``
            (partial cross-entropy).
        oem: OEM mode's options (defaults when None; only read by ``"agmm"``).
        hard_fraction: OHEM fraction of the segmentation loss of ``"baseline"`` and ``"agmm"``.
        fused: How the kernel block's pixel terms run (``"cvpr"`` and ``"agmm"``): ``"auto"``,
            ``"eager"`` or ``"compile"`` (:data:`~agmm_lightning.agmm.bands.Fused`).

    Attributes:
        embedding_head: The 1x1 convolution into the mixtures' space (OEM mode only).
        mixtures: The class mixtures (OEM mode only).
    """

    def __init__(
        self,
        network: smp.base.SegmentationModel,
        num_classes: int,
        method: Method = "agmm",
        oem: OEMOptions | None = None,
        hard_fraction: float = 1.0,
        fused: Fused = "auto",
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise InputError(f"method must be one of {list(METHODS)}, got {method!r}")
        self.network = network
        self.num_classes = num_classes
        self.method = method
        self.oem = oem or OEMOptions()
        self.hard_fraction = hard_fraction
        check_choice("fused", fused, get_args(Fused))
        self.fused = fused
        if method == "agmm":
            decoder_channels = network.segmentation_head[0].in_channels
            self.embedding_head = nn.Conv2d(decoder_channels, self.oem.embed_dim, kernel_size=1)
            self.mixtures = ClassMixtures(
                num_classes,
                self.oem.embed_dim,
                self.oem.mixture_count,
                self.oem.oem_momentum,
                self.oem.min_variance,
            )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Logits at the input resolution and the decoder features, in one pass.

        Inputs whose size is not a multiple of the encoder's output stride are padded at the
        bottom and right, and the outputs cropped back.

        Args:
            images: ``[B, 3, H, W]`` normalised images.

        Returns:
            ``[B, C, H, W]`` logits and ``[B, D0, h, w]`` decoder features.
        """
        network = self.network
        height, width = images.shape[-2:]
        stride = network.encoder.output_stride
        pad_h, pad_w = -height % stride, -width % stride
        padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
        features = network.decoder(network.encoder(padded))
        logits = network.segmentation_head(features)
        if logits.shape[-2:] != padded.shape[-2:]:
            logits = F.interpolate(
                logits, size=padded.shape[-2:], mode="bilinear", align_corners=False
            )
        scale = features.shape[-1] / padded.shape[-1]
        feature_size = (math.ceil(height * scale), math.ceil(width * scale))
        return logits[..., :height, :width], features[..., : feature_size[0], : feature_size[1]]

    def embed(self, features: Tensor) -> Tensor:
        """The embedding e the mixtures live in (METHOD §3.1) of decoder feature vectors.

        Args:
            features: ``[..., D0]`` decoder feature vectors (channels last).

        Returns:
            ``[..., D]`` float32 embeddings, L2-normalised when ``normalize_embeddings``.
        """
        head = self.embedding_head
        embeddings = F.linear(features.float(), head.weight.flatten(1), head.bias)
        if self.oem.normalize_embeddings:
            embeddings = F.normalize(embeddings, dim=-1)
        return embeddings

    def classify(self, features: Tensor) -> Tensor:
        """Float32 logits of decoder features at their own resolution (the head's convolution).

        Args:
            features: ``[B, D0, h, w]`` decoder features.

        Returns:
            ``[B, C, h, w]`` logits; the head's upsampling, if any, is left out.
        """
        conv = self.network.segmentation_head[0]
        bias = None if conv.bias is None else conv.bias.float()
        return F.conv2d(features.float(), conv.weight.float(), bias, padding=conv.padding)

    def losses(self, batch: dict[str, Any], step: int = 0) -> tuple[StepLosses, Tensor]:
        """The loss terms of the method on a training batch, and the logits.

        The network runs in the autocast dtype; the losses in float32, each upcasting its inputs.

        Args:
            batch: ``image`` ``[B, 3, H, W]``, ``target`` ``[B, H, W]``, ``image_classes``
                ``[B, C]`` and, for boxes, ``allowed`` ``[B, C, H, W]``.
            step: The optimizer step (OEM mode's warm-up counts in steps).

        Returns:
            The terms (with, in OEM mode, the GMM posterior and the refit's statistics) and the
            ``[B, C, H, W]`` logits.

        Raises:
            ValueError: If the target holds values outside the convention.
        """
        target = batch["target"]
        check_target(target, self.num_classes)
        logits, features = self(batch["image"])
        with float32_math(logits.device), fused_pixel_terms(self.fused):
            if self.method == "baseline":
                seg = partial_cross_entropy(logits, target, hard_fraction=self.hard_fraction)
                step_losses = StepLosses({"seg": seg})
            elif self.method == "cvpr":
                terms = cvpr_agmm_losses(
                    features,
                    logits,
                    target,
                    self.num_classes,
                    batch.get("image_classes"),
                    batch.get("allowed"),
                )
                terms.pop("total")
                step_losses = StepLosses(terms)
            else:
                step_losses = oem_losses(
                    batch,
                    logits,
                    features,
                    embed=self.embed,
                    classify=self.classify,
                    mixtures=self.mixtures,
                    options=self.oem,
                    step=step,
                    hard_fraction=self.hard_fraction,
                )
        return step_losses, logits
