"""Neighbourhood patterns beyond plain neighborhood attention: factorization and mixture_of_sparse (head groups),
gated_cross_neighborhood, msa_conv.

References are equivalences with ``neighborhood`` and oracles written here from the definitions; float64, eval
mode, every parameter randomised.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo

from conftest import changed_positions, create_random, rand64

TOL = dict(rtol=1e-10, atol=1e-10)
DT = torch.float64


# ---------------------------------------------------------------------------------------------------- factorization, mixture_of_sparse


def neighborhood_like(source, **kwargs):
    target = attnzoo.create("neighborhood", source.dim, rel_pos_bias=False, **kwargs).to(DT).eval()
    target.load_state_dict(source.state_dict())
    return target


def test_factorization_with_one_group_is_neighborhood():
    ours = create_random("factorization", 16, kernel_size=3, dilation=(2,), num_heads=2)
    x = rand64(2, 9, 8, 16)
    torch.testing.assert_close(ours(x), neighborhood_like(ours, num_heads=2, kernel_size=3, dilation=2)(x), **TOL)


def test_mixture_of_sparse_with_equal_groups_is_neighborhood():
    ours = create_random("mixture_of_sparse", 16, kernel_size=(5, 5), num_heads=4)
    x = rand64(2, 7, 9, 16)
    torch.testing.assert_close(ours(x), neighborhood_like(ours, num_heads=4, kernel_size=5)(x), **TOL)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("factorization", dict(kernel_size=3, dilation=(1, 3))),
        ("mixture_of_sparse", dict(kernel_size=(3, (5, 7)))),
    ],
)
def test_head_groups_each_equal_the_neighborhood_of_their_own_geometry(name, kwargs):
    """Output heads of group g (before the projection) equal a neighborhood module with group g's geometry."""
    ours = create_random(name, 16, num_heads=4, **kwargs)
    x = rand64(1, 11, 10, 16)
    q, k, v = ours.qkv(x).reshape(1, 11, 10, 3, 4, 4).unbind(3)
    from attnzoo.ops import neighborhood_attention

    heads = neighborhood_attention(q, k, v, ours.kernel_size, dilation=ours.dilation, head_groups=ours.head_groups)
    for g, (kk, dd) in enumerate(zip(ours.kernel_size, ours.dilation)):
        sl = slice(2 * g, 2 * g + 2)
        alone = neighborhood_attention(
            q[..., sl, :], k[..., sl, :], v[..., sl, :], kk, dilation=dd, backend="reference"
        )
        torch.testing.assert_close(heads[..., sl, :], alone, **TOL)
    torch.testing.assert_close(ours(x), ours.proj(heads.reshape(1, 11, 10, 16)), **TOL)


def test_factorization_receptive_field_is_the_union_of_its_groups_neighborhoods():
    from attnzoo.ops import neighborhood_mask

    ours = create_random("factorization", 16, kernel_size=3, dilation=(1, 3), num_heads=2)
    x = rand64(1, 12, 12, 16)
    key = 6 * 12 + 6
    near, far = neighborhood_mask((12, 12), 3, dilation=1)[:, key], neighborhood_mask((12, 12), 3, dilation=3)[:, key]
    assert (far & ~near).any() and (near & ~far).any()
    assert torch.equal(changed_positions(ours, x, (6, 6)), (near | far).reshape(12, 12))


def test_grouped_mechanisms_reject_bad_groups():
    with pytest.raises(ValueError, match="num_heads=3 must be divisible"):
        attnzoo.create("factorization", 24, dilation=(1, 2), num_heads=3)
    with pytest.raises(TypeError, match="kernel_size=5"):
        attnzoo.create("mixture_of_sparse", 32, kernel_size=5)


# ---------------------------------------------------------------------------------------------------- gated_cross_neighborhood


def test_gated_cross_neighborhood_on_one_stream_is_gated_neighborhood_self_attention():
    ours = create_random("gated_cross_neighborhood", 16, num_heads=2, kernel_size=3, dilation=2)
    nat = attnzoo.create("neighborhood", 16, num_heads=2, kernel_size=3, dilation=2).to(DT).eval()
    state = ours.state_dict()
    nat.load_state_dict(
        {
            "qkv.weight": torch.cat([state[f"embed_{n}.weight"] for n in "qkv"]),
            "qkv.bias": torch.cat([state[f"embed_{n}.bias"] for n in "qkv"]),
            "proj.weight": state["proj.weight"],
            "proj.bias": state["proj.bias"],
            "rpb": state["rpb"],
        }
    )
    x = rand64(2, 7, 9, 16)
    t = torch.tanh(ours.gate)
    torch.testing.assert_close(ours(x), (1 - t) * x + t * nat(x), **TOL)
    torch.testing.assert_close(ours(x, x), ours(x), **TOL)


def test_gated_cross_neighborhood_queries_come_from_x_and_keys_from_context():
    from attnzoo.ops import neighborhood_mask

    ours = create_random("gated_cross_neighborhood", 16, num_heads=2, kernel_size=3)
    x, context = rand64(1, 7, 7, 16), rand64(1, 7, 7, 16, seed=1)
    only_itself = torch.zeros(7, 7, dtype=torch.bool)
    only_itself[3, 4] = True  # x gives the query (and the gated shortcut) of its own position only
    assert torch.equal(changed_positions(lambda t: ours(t, context), x, (3, 4)), only_itself)
    window = neighborhood_mask((7, 7), 3)[:, 3 * 7 + 4].reshape(7, 7)
    assert torch.equal(changed_positions(lambda t: ours(x, t), context, (3, 4)), window)


def test_gated_cross_neighborhood_gate_zero_is_identity_and_bad_context_is_named():
    ours = create_random("gated_cross_neighborhood", 16, num_heads=2, kernel_size=3)
    with torch.no_grad():
        ours.gate.zero_()  # the official initialisation
    x = rand64(1, 5, 6, 16)
    torch.testing.assert_close(ours(x, rand64(1, 5, 6, 16, seed=2)), x, **TOL)
    with pytest.raises(ValueError, match="context.shape"):
        ours(x, rand64(1, 5, 5, 16))


# ---------------------------------------------------------------------------------------------------- msa_conv


def msa_conv_oracle(m, x, mask_padding=False):
    """Official MSA_Conv_2d with the im2col op written with F.unfold: logits over the k×k zero-padded window."""
    b, h, w, c = x.shape
    k, d = m.kernel_size, m.dilation
    q, key, v = m.qkv(x).permute(0, 3, 1, 2).chunk(3, dim=1)
    unfold = lambda t: F.unfold(t, k, dilation=d, padding=d * (k // 2)).reshape(b, c, k * k, h, w)  # noqa: E731
    dots = (q[:, :, None] * unfold(key)).sum(1) * c**-0.5  # [B, k², H, W]
    if mask_padding:
        inside = unfold(torch.ones(1, 1, h, w, dtype=x.dtype).expand(b, c, h, w))[:, :1] > 0
        dots = dots.masked_fill(~inside[:, 0], float("-inf"))
    attn = dots.softmax(1)
    out = (attn[:, None] * unfold(v)).sum(2) + x.permute(0, 3, 1, 2)
    return F.relu(m.mlp(out)).permute(0, 2, 3, 1)


@pytest.mark.parametrize("kernel, dilation, mask", [(3, 1, False), (5, 2, False), (3, 2, True)])
def test_msa_conv_matches_official_unfold_definition(kernel, dilation, mask):
    ours = create_random("msa_conv", 8, kernel_size=kernel, dilation=dilation, mask_padding=mask)
    x = rand64(2, 6, 7, 8)
    torch.testing.assert_close(ours(x), msa_conv_oracle(ours, x, mask), **TOL)


def test_msa_conv_padding_mode_only_changes_border_windows():
    ours = create_random("msa_conv", 8, kernel_size=3)
    masked = create_random("msa_conv", 8, kernel_size=3, mask_padding=True)
    masked.load_state_dict(ours.state_dict())
    x = rand64(1, 8, 8, 8)
    diff = (ours(x) - masked(x)).abs().amax(-1)[0] > 1e-12
    # attention differs on the border ring; the 3x3 conv spreads it one more pixel inwards
    assert diff[0].all() and not diff[3:5, 3:5].any()
