"""The backend contract: say why you cannot run a problem, or run it."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed (softmax included) in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with ``-inf`` (a query whose keys were all dropped) replaced by 0, so ``exp(score - lse)`` is 0."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
