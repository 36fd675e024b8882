"""The shared transformer blocks (`core.generators.nn.blocks`) against the properties they promise: shapes, the
key/value cache equal to a full causal pass, RoPE's relative positions, adaLN-Zero's identity at initialisation,
RMSNorm's scale, the timestep features, and errors for unusable settings."""

from __future__ import annotations

import math

import pytest
import torch

from wyckoff_lab.core.generators.nn import blocks


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def test_sinusoidal_positions_follow_vaswani():
    table = blocks.sinusoidal_positions(50, 16)
    assert table.shape == (50, 16)
    pos, i = 7, 3  # channel pair (2i, 2i + 1)
    angle = pos / 10000 ** (2 * i / 16)
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("dim", [8, 9])
def test_timestep_features_are_cos_then_sin_of_continuous_times(dim):
    t = torch.tensor([0.0, 0.25, 3.5])
    features = blocks.timestep_features(t, dim)
    assert features.shape == (3, dim)
    half = dim // 2
    assert torch.allclose(features[0, :half], torch.ones(half))  # cos(0)
    assert torch.allclose(features[0, half:2 * half], torch.zeros(half))  # sin(0)
    assert features[2, 0].item() == pytest.approx(math.cos(3.5), abs=1e-6)  # frequency 1 first
    assert features[2, half].item() == pytest.approx(math.sin(3.5), abs=1e-6)
    if dim % 2:
        assert torch.all(features[:, -1] == 0)  # the odd channel is padding
    embedded = blocks.TimestepEmbedding(32, frequency_dim=dim)(t)
    assert embedded.shape == (3, 32)
    assert not torch.allclose(embedded[1], embedded[2])  # nearby fractional times stay distinguishable


def test_rope_scores_depend_only_on_the_position_difference():
    rope = blocks.RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i: int, j: int) -> float:
        return float((rope(q, start=i) * rope(k, start=j)).sum())

    assert score(3, 1) == pytest.approx(score(12, 10), rel=1e-4, abs=1e-4)
    assert score(5, 5) == pytest.approx(float((q * k).sum()), rel=1e-4, abs=1e-4)  # no shift: no rotation
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
    rotated = rope(q, start=9)
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)  # a rotation keeps norms
    with pytest.raises(ValueError, match="even head dimension"):
        blocks.RotaryEmbedding(15)


def test_rms_norm_gives_unit_root_mean_square_times_its_gain():
    layer = blocks.RMSNorm(8)
    x = 5.0 * torch.randn(4, 3, 8)
    y = layer(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(4, 3), atol=1e-4)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    assert torch.allclose(layer(x), 2 * y, atol=1e-5)
    assert torch.allclose(layer(3 * x), layer(x), atol=1e-5)  # scale invariant, unlike LayerNorm without centring
    assert isinstance(blocks.norm("layer", 8), torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="norm must be"):
        blocks.norm("batch", 8)


def test_swiglu_is_the_gated_product_and_keeps_shapes():
    layer = blocks.SwiGLU(8, 24)
    x = torch.randn(2, 5, 8)
    y = layer(x)
    assert y.shape == x.shape
    expected = layer.down(torch.nn.functional.silu(layer.gate(x)) * layer.up(x))
    assert torch.allclose(y, expected)
    assert blocks.MLP(8, 24)(x).shape == x.shape


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("feed_forward,norm_kind", [("gelu", "layer"), ("swiglu", "rms")])
def test_kv_cache_decoding_equals_the_full_causal_pass(rotary, feed_forward, norm_kind):
    d, heads, layers, length, batch = 32, 4, 2, 9, 3
    rope = blocks.RotaryEmbedding(d // heads) if rotary else None
    stack = torch.nn.ModuleList(
        blocks.TransformerBlock(d, heads, causal=True, norm_kind=norm_kind, feed_forward=feed_forward, rotary=rope)
        for _ in range(layers)).eval()
    x = torch.randn(batch, length, d)
    with torch.no_grad():
        full = x
        for block in stack:
            full = block(full)
        cache = blocks.new_kv_cache(batch, layers, heads, length, d // heads)
        stepped = []
        for t in range(length):
            h = x[:, t:t + 1]
            for block, layer_cache in zip(stack, cache):
                h = block(h, layer_cache, start=t)
            stepped.append(h)
    assert torch.allclose(torch.cat(stepped, dim=1), full, atol=1e-5)


def test_causal_attention_does_not_look_ahead_and_full_attention_does():
    x = torch.randn(1, 6, 16)
    changed = x.clone()
    changed[:, 4:] += 1.0  # only the future of position 3
    causal = blocks.Attention(16, 2, causal=True).eval()
    full = blocks.Attention(16, 2, causal=False).eval()
    with torch.no_grad():
        assert torch.allclose(causal(x)[:, :4], causal(changed)[:, :4], atol=1e-6)
        assert not torch.allclose(full(x)[:, :4], full(changed)[:, :4], atol=1e-4)


def test_attention_refuses_unusable_settings():
    with pytest.raises(ValueError, match="must divide"):
        blocks.Attention(30, 4)
    cache = blocks.new_kv_cache(1, 1, 2, 4, 8)[0]
    with pytest.raises(ValueError, match="causal"):
        blocks.Attention(16, 2, causal=False)(torch.randn(1, 1, 16), cache, start=0)
    with pytest.raises(ValueError, match="one position at a time"):
        blocks.Attention(16, 2)(torch.randn(1, 2, 16), cache, start=0)
    with pytest.raises(ValueError, match="feed_forward"):
        blocks.TransformerBlock(16, 2, feed_forward="relu")


def test_adaln_block_is_the_identity_at_initialisation_and_conditioned_after_training_moves_it():
    block = blocks.AdaLNBlock(16, 2).eval()
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(block(x, c), x)  # adaLN-Zero: the gates start at exactly zero
        torch.nn.init.normal_(block.modulation.linear.weight, std=0.1)
        y1, y2 = block(x, c), block(x, -c)
    assert not torch.allclose(y1, x)
    assert not torch.allclose(y1, y2)  # the conditioning changes the output
    shift, scale = torch.randn(2, 16), torch.randn(2, 16)
    assert torch.allclose(blocks.modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
