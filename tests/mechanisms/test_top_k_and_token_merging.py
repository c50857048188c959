"""Top-k and token-merging mechanisms: ``learned_sparse``, ``global_local_cross``, ``token_merge``.

Each has a degenerate setting that must equal ``mhsa`` (weights copied), a written-out oracle with explicit loops for
the selection step, and a check of what the selection passes to gradients (as their ``note`` states).
"""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.mechanisms import mechanism_info

from conftest import hand_attention, heads_of, randomize_

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def make(name, dim=16, seed=0, **kwargs):
    torch.manual_seed(seed)
    m = attnzoo.create(name, dim, **kwargs).to(DT).eval()
    return randomize_(m)


def mhsa_like(m, qkv, dim=16, heads=2, bias=True):
    ref = attnzoo.create("mhsa", dim, num_heads=heads, qkv_bias=bias).to(DT).eval()
    state = {"qkv.weight": qkv.weight, "proj.weight": m.proj.weight, "proj.bias": m.proj.bias}
    if bias:
        state["qkv.bias"] = qkv.bias
    ref.load_state_dict(state)
    return ref


# ------------------------------------------------------------------------------------------------- learned_sparse


def test_learned_sparse_with_k_equal_n_is_mhsa():
    m = make("learned_sparse", num_heads=2, input_resolution=(4, 5), topk=20)
    x = torch.randn(2, 4, 5, 16, dtype=DT)
    torch.testing.assert_close(m(x), mhsa_like(m, m.qkv, bias=False)(x), **TOL)


def test_learned_sparse_matches_written_out_predictor_and_top_k_mask():
    m = make("learned_sparse", num_heads=2, input_resolution=(4, 5), topk=6, reduce_n=4)
    x = torch.randn(2, 4, 5, 16, dtype=DT)
    tokens = x.reshape(2, 20, 16)
    q, k, v = (heads_of(t, 2) for t in (tokens @ m.qkv.weight.T).chunk(3, dim=-1))
    allowed = torch.zeros(2, 2, 20, 20, dtype=torch.bool)
    for b in range(2):
        for h in range(2):
            qc = q[b, :, h] @ m.predict_q.weight.T + m.predict_q.bias  # [N, c]
            kc = k[b, :, h] @ m.predict_k.weight.T + m.predict_k.bias
            basis_keys = m.token_basis.T @ kc  # [K, c]
            coef = torch.softmax((qc @ basis_keys.T) / math.sqrt(2), dim=-1)  # official scale num_heads**-0.5
            approx = coef @ m.basis_back.T
            for i in range(20):
                allowed[b, h, i, approx[i].argsort(descending=True)[:6]] = True
    out, _ = hand_attention(q, k, v, 8**-0.5, allowed=allowed)
    expected = out.reshape(2, 20, 16) @ m.proj.weight.T + m.proj.bias
    torch.testing.assert_close(m(x), expected.reshape(x.shape), **TOL)
    assert allowed.sum(-1).eq(6).all()


def test_learned_sparse_top_k_passes_no_gradient_and_the_predictor_learns_from_aux_loss():
    m = make("learned_sparse", num_heads=2, input_resolution=(4, 4), topk=5).train()
    predictor = [m.predict_q.weight, m.predict_k.weight, m.token_basis, m.basis_back]
    x = torch.randn(2, 4, 4, 16, dtype=DT)
    y = m(x)
    grads = torch.autograd.grad(y.square().sum(), predictor, allow_unused=True)
    assert all(g is None for g in grads), "the top-k mask leaked a gradient into the predictor"
    assert isinstance(m.aux_loss(), torch.Tensor) and m.aux_loss() > 0
    grads = torch.autograd.grad(m.aux_loss(), predictor)
    assert all(g.abs().sum() > 0 for g in grads)


def test_learned_sparse_rejects_other_token_counts_and_too_large_k():
    m = make("learned_sparse", num_heads=2, input_resolution=(4, 4))
    with pytest.raises(ValueError, match="input_resolution"):
        m(torch.randn(1, 4, 5, 16, dtype=DT))
    with pytest.raises(ValueError, match="topk=17"):
        attnzoo.create("learned_sparse", 16, input_resolution=(4, 4), topk=17)


# --------------------------------------------------------------------------------------------- global_local_cross


def test_global_local_cross_with_r_equal_n_is_mhsa_with_the_glca_weights():
    m = make("global_local_cross", num_heads=2, topk=11)
    x = torch.randn(3, 11, 16, dtype=DT)
    torch.testing.assert_close(m(x), mhsa_like(m, m.glca_qkv)(x), **TOL)


def glca_oracle(m, x, r, previous=None):
    """Written out; ``previous`` is the rollout of the earlier blocks ``[B, N, N]`` (identity when None)."""
    b, n, c = x.shape
    q, k, v = (heads_of(t, 2) for t in (x @ m.qkv.weight.T + m.qkv.bias).chunk(3, dim=-1))
    gq, gk, gv = (heads_of(t, 2) for t in (x @ m.glca_qkv.weight.T + m.glca_qkv.bias).chunk(3, dim=-1))
    out, _ = hand_attention(q, k, v, 8**-0.5)
    local, _ = hand_attention(gq, gk, gv, 8**-0.5)
    rows = []
    for i in range(b):
        weights = torch.stack([torch.softmax(q[i, :, h] @ k[i, :, h].T * 8**-0.5, -1) for h in range(2)])
        rollout = 0.5 * weights.mean(0) + 0.5 * torch.eye(n, dtype=DT)
        if previous is not None:
            rollout = rollout @ previous[i]
        received = torch.stack([sum(rollout[row, col] for row in range(n)) / n for col in range(n)]).detach()
        chosen = received.argsort(descending=True)[:r]
        row = out[i].clone()
        row[chosen] = local[i, chosen]
        rows.append(row)
    return torch.stack(rows).reshape(b, n, c) @ m.proj.weight.T + m.proj.bias


def test_global_local_cross_matches_the_written_out_selection_and_its_gradients():
    m = make("global_local_cross", num_heads=2, topk=3)
    x = torch.randn(2, 9, 16, dtype=DT, requires_grad=True)
    y, expected = m(x), glca_oracle(m, x, 3)
    torch.testing.assert_close(y, expected, **TOL)
    probe = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * probe).sum(), x)
    (g_ref,) = torch.autograd.grad((expected * probe).sum(), x)
    torch.testing.assert_close(g, g_ref, **TOL)
    grads = torch.autograd.grad((m(x) * probe).sum(), [m.qkv.weight, m.glca_qkv.weight])
    assert all(gr.abs().sum() > 0 for gr in grads)  # both branches train; the selection itself is integer indices


def test_global_local_cross_accumulates_the_rollout_over_blocks():
    from attnzoo import BlockState

    first = make("global_local_cross", seed=1, num_heads=2, topk=3)
    second = make("global_local_cross", seed=2, num_heads=2, topk=3)
    x0, x1 = torch.randn(2, 9, 16, dtype=DT), torch.randn(2, 9, 16, dtype=DT)
    state = BlockState()
    torch.testing.assert_close(first(x0, state), glca_oracle(first, x0, 3), **TOL)
    (rollout,) = state.read("global_local_cross")
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 9, dtype=DT), **TOL)  # rows stay stochastic
    y = second(x1, state)
    torch.testing.assert_close(y, glca_oracle(second, x1, 3, previous=rollout), **TOL)
    chosen_alone = second(x1)
    assert not torch.allclose(y, chosen_alone), "the earlier block's rollout changed no selection"


def test_global_local_cross_default_selects_ten_percent():
    m = make("global_local_cross", num_heads=2)
    assert m.num_selected(196) == 20 and m.num_selected(5) == 1
    with pytest.raises(ValueError, match="topk=4"):
        make("global_local_cross", num_heads=2, topk=4)(torch.randn(1, 3, 16, dtype=DT))


# ---------------------------------------------------------------------------------------------------- token_merge


def test_token_merge_with_ratio_zero_is_mhsa():
    m = make("token_merge", num_heads=2, ratio=0.0)
    x = torch.randn(2, 5, 6, 16, dtype=DT)
    torch.testing.assert_close(m(x), mhsa_like(m, m.qkv)(x), **TOL)


def test_token_merge_of_duplicated_cells_with_proportional_attention_is_mhsa():
    # every 2×2 cell of the top 6×6 holds four copies of one token, the 7th row distinct tokens: merging the 27
    # duplicate sources (ratio 0.65 of 42 tokens) loses nothing, and ToMe's proportional attention (log 4 on each
    # merged key, 0 on the distinct ones) restores the softmax mass of the copies exactly; plain attention does not.
    cells = torch.randn(2, 3, 3, 16, dtype=DT)
    top = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    x = torch.cat([top, torch.randn(2, 1, 6, 16, dtype=DT)], dim=1)
    m = make("token_merge", num_heads=2, ratio=0.65)
    reference = mhsa_like(m, m.qkv)(x)
    torch.testing.assert_close(m(x), reference, **TOL)
    plain = make("token_merge", num_heads=2, ratio=0.65, proportional=False)
    assert not torch.allclose(plain(x), reference)


def tome_oracle(m, x, ratio):
    """tomesd's matching written with loops (destination = top-left of each 2×2 cell), then mean, attend, copy."""
    b, rows, cols, c = x.shape
    n = rows * cols
    dst = [i * cols + j for i in range(0, rows // 2 * 2, 2) for j in range(0, cols // 2 * 2, 2)]
    src = [p for p in range(n) if p not in dst]
    r = min(int(n * ratio), len(src))
    out = torch.zeros(b, n, c, dtype=DT)
    for i in range(b):
        t = x[i].reshape(n, c)
        unit = t / t.norm(dim=-1, keepdim=True)
        best = {s: max(dst, key=lambda d: (unit[s] @ unit[d]).item()) for s in src}
        score = {s: (unit[s] @ unit[best[s]]).item() for s in src}
        ranked = sorted(src, key=lambda s: -score[s])
        merged, kept = ranked[:r], ranked[r:]
        groups = {d: [d] + [s for s in merged if best[s] == d] for d in dst}
        reps = [t[s] for s in kept] + [t[groups[d]].mean(0) for d in dst]
        sizes = [1.0] * len(kept) + [float(len(groups[d])) for d in dst]
        z = torch.stack(reps)[None]
        q, k, v = (heads_of(u, 2) for u in (z @ m.qkv.weight.T + m.qkv.bias).chunk(3, dim=-1))
        bias = torch.tensor(sizes, dtype=DT).log().expand(1, 2, len(reps), len(reps))
        o, _ = hand_attention(q, k, v, 8**-0.5, bias=bias)
        o = o.reshape(len(reps), c) @ m.proj.weight.T + m.proj.bias
        for j, s in enumerate(kept):
            out[i, s] = o[j]
        for j, d in enumerate(dst):
            for p in groups[d]:
                out[i, p] = o[len(kept) + j]
    return out.reshape(x.shape)


@pytest.mark.parametrize("size, ratio", [((5, 7), 0.5), ((4, 4), 0.3), ((6, 6), 0.9)])
def test_token_merge_matches_the_written_out_bipartite_matching(size, ratio):
    m = make("token_merge", num_heads=2, ratio=ratio)
    x = torch.randn(2, *size, 16, dtype=DT)
    torch.testing.assert_close(m(x), tome_oracle(m, x, ratio), **TOL)


def test_token_merge_gradients_reach_every_token_through_means_and_copies():
    m = make("token_merge", num_heads=2, ratio=0.5)
    x = torch.randn(2, 6, 6, 16, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad((m(x) * torch.randn(2, 6, 6, 16, dtype=DT)).sum(), x)
    assert (g.abs().sum(-1) > 0).all()


def test_top_k_mechanisms_are_deterministic_and_state_their_gradient_behaviour():
    for name in ("learned_sparse", "global_local_cross", "token_merge"):
        info = mechanism_info(name)
        assert "gradient" in info.note
        size = (4, 4)
        kwargs = {"input_resolution": size} if name == "learned_sparse" else {}
        x = torch.randn(2, *size, 16, dtype=DT)
        torch.testing.assert_close(
            make(name, seed=3, **kwargs).train()(x), make(name, seed=3, **kwargs).train()(x), rtol=0, atol=0
        )
    assert "ratio sets the cost" in mechanism_info("token_merge").note
