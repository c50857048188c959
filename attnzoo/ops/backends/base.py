"""The backend contract: say why you cannot run a problem, or run it."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch._subclasses.fake_tensor import is_fake

from ..problem import NAProblem

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Backend(ABC):
    """A way to compute neighborhood attention. ``backend="auto"`` takes the first one with no reasons."""

    name: str = ""
    description: str = ""

    @abstractmethod
    def not_supported_reasons(self, problem: NAProblem) -> list[str]:
        """Every reason this backend cannot run ``problem`` (empty when it can)."""

    @abstractmethod
    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        problem: NAProblem,
        *,
        scale: float,
        additional_keys: torch.Tensor | None,
        additional_values: torch.Tensor | None,
        rel_pos_bias: torch.Tensor | None,
        key_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(output, lse)``; ``lse`` may be ``None`` unless ``problem.return_lse``."""

    def __repr__(self) -> str:
        return f"<attnzoo backend {self.name!r}>"


def values_readable(t: torch.Tensor) -> bool:
    """Whether a data-dependent branch may read ``t``'s values on the host: not when traced (``torch.compile``,
    ``torch.export``) and not for tensors without data (``meta``, or fake tensors as FLOP counting and tracing use);
    the caller then takes the branch that is right for any values."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return False
    return not (t.is_meta or is_fake(t))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed (softmax included) in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def softmax_with_lse(scores: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax of ``scores`` along ``dim`` and its logsumexp (``dim`` removed).

    Safe when a row is entirely ``-inf`` (a query whose keys were all masked or dropped): its weights are 0, its
    lse is ``-inf``, and both have zero gradient. ``torch.logsumexp`` gives NaN gradients there, because its
    backward computes ``exp(-inf - (-inf))``. The shift is the row maximum, taken over finite entries only.
    """
    peak = scores.detach().amax(dim, keepdim=True)
    peak = torch.where(torch.isneginf(peak), torch.zeros_like(peak), peak)
    unnormalised = torch.exp(scores - peak)
    total = unnormalised.sum(dim, keepdim=True)
    empty = total == 0  # the row maximum contributes exp(0) = 1, so only an all -inf row sums to 0
    total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), peak + torch.log(total))
    return unnormalised / total, lse.squeeze(dim)
