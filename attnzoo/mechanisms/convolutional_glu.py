"""TransNeXt Convolutional GLU: a GLU channel mixer whose gate branch sees its 3×3 neighbourhood."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import Mechanism, check_int, check_positive, check_probability
from ._channel_conv import to_nchw, to_nhwc
from .registry import register_mechanism


@register_mechanism(
    "convolutional_glu",
    family="channel",
    paper="TransNeXt: Robust Foveal Visual Perception for Vision Transformers",
    year=2024,
    complexity="linear",
    is_attention=False,
    slot="channel",
    receptive_field="local",
    reference="official DaiShiResearch/TransNeXt classification/transnext.py::ConvolutionalGLU (read)",
    note="A channel mixer (the MLP slot of a block): attnzoo.models.create(..., channel_mixer='convolutional_glu').",
    size_args={"kernel_size": "kernel"},
)
class ConvolutionalGLU(Mechanism):
    """Convolutional GLU (Shi, TransNeXt, CVPR 2024): fc2(GELU(DWConv3×3(g)) ⊙ v) with [g, v] = fc1(x).

    The hidden width is ``int(2/3 · int(dim · mlp_ratio))`` so that the two fc1 halves plus fc2 cost as many
    parameters as an MLP of ratio ``mlp_ratio``; the depthwise conv (with bias, zero padding) acts on the gate half
    only.

    Args:
        dim: channels in and out.
        mlp_ratio: width of the MLP this replaces, as a multiple of ``dim`` (TransNeXt: 8 in stages 1–2, 4 later).
        kernel_size: side of the depthwise conv of the gate branch (3 in the paper).
        proj_drop: dropout after the gated product and after fc2.
    """

    def __init__(self, dim: int, *, mlp_ratio: float = 4.0, kernel_size: int = 3, proj_drop: float = 0.0) -> None:
        super().__init__(dim)
        check_positive("mlp_ratio", mlp_ratio)
        self.kernel_size = check_int("kernel_size", kernel_size, odd=True)
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        if hidden < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} gives hidden width {hidden} for dim={dim}; it must be >= 1")
        self.hidden = hidden
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(check_probability("proj_drop", proj_drop))
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        gate, value = self.fc1(x).chunk(2, dim=-1)
        gate = to_nhwc(self.dwconv(to_nchw(gate)))
        return self.drop(self.fc2(self.drop(self.act(gate) * value)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, kernel_size={self.kernel_size}"
