"""Dense masked attention: the oracle every other backend is tested against."""

from __future__ import annotations

import torch

from ..geometry import neighborhood_mask, neighborhood_rel_index
from ..problem import NAProblem
from .base import Backend, compute_dtype, softmax_with_lse


class ReferenceBackend(Backend):
    name = "reference"
    description = "dense N×N masked attention (any float dtype, any device, autograd); the oracle"

    def not_supported_reasons(self, problem: NAProblem) -> list[str]:
        return []

    def run(self, q, k, v, problem: NAProblem, *, scale, additional_keys, additional_values, rel_pos_bias, key_bias):
        b, h, n = problem.batch, problem.heads, problem.num_tokens
        ct = compute_dtype(q.dtype)
        qf, kf, vf = (t.reshape(b, n, h, t.shape[-1]).to(ct) for t in (q, k, v))
        p = problem
        mask = neighborhood_mask(p.spatial_shape, p.kernel_size, p.stride, p.dilation, p.is_causal).to(q.device)
        scores = torch.einsum("bnhd,bmhd->bhnm", qf, kf) * scale
        if rel_pos_bias is not None:
            index = neighborhood_rel_index(p.spatial_shape, p.kernel_size, p.stride, p.dilation, p.is_causal)
            table = rel_pos_bias.reshape(h, -1).to(ct)
            scores = scores + table[:, index.clamp(min=0).to(q.device)]
        if key_bias is not None:
            kb = key_bias.expand(b, *p.spatial_shape, h).reshape(b, n, h).to(ct)
            scores = scores + kb.transpose(1, 2).unsqueeze(2)
        scores = scores.masked_fill(~mask, float("-inf"))
        values = vf
        if additional_keys is not None:
            extra = torch.einsum("bnhd,bmhd->bhnm", qf, additional_keys.to(ct)) * scale
            scores = torch.cat([scores, extra], dim=-1)
            values = torch.cat([vf, additional_values.to(ct)], dim=1)
        weights, lse = softmax_with_lse(scores)
        out = torch.einsum("bhnm,bmhd->bnhd", weights, values)
        out = out.reshape(*q.shape[:-1], v.shape[-1]).to(q.dtype)
        lse = lse.transpose(1, 2).reshape(q.shape[:-1])
        return out, lse
