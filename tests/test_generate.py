"""The sampler's fast paths: inverse-CDF draws, the shared prefill of repeated prompts, the one-token attention
of cached decoding, the norm outputs cast once under autocast, and a KV cache taken by rows.

Tolerances: decode_attention computes the same sums as SDPA in another order (scores over S = 37 keys of
hs = 16, values of size ~1): fp32 round-off is about S·eps, well under the 1e-5 used.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_checkpoint

import minicustom as mc
from minicustom.generate import draw, left_pad
from minicustom.model import KVCache, Prefix, decode_attention, matmul_input


def test_draw_follows_the_probabilities_and_never_draws_a_zero():
    """Frequencies over N draws are within 5 standard deviations, sqrt(p (1 - p) / N), of p / sum(p); rows
    need not sum to one, and zero entries (first, inner and last) never come up."""
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0],
                          [2.0, 0.0, 1.0, 0.0, 0.0, 1.0],
                          [0.0, 0.0, 0.0, 0.0, 1e-3, 0.0]])
    N = 40_000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(probs)
    for _ in range(N // 1000):
        picks = torch.stack([draw(probs, g) for _ in range(1000)], dim=1)  # (3, 1000)
        counts += F.one_hot(picks, probs.shape[1]).sum(dim=1)
    p = probs / probs.sum(dim=1, keepdim=True)
    assert torch.all(counts[p == 0] == 0)
    assert torch.all((counts / N - p).abs() <= 5 * (p * (1 - p) / N).sqrt())


def test_draw_refuses_rows_it_cannot_sample():
    for bad in (torch.zeros(2, 5), torch.full((1, 5), float("nan"))):
        with pytest.raises(ValueError, match="NaN or all zero"):
            draw(bad)


def test_draw_is_seeded():
    probs = torch.rand(4, 50)
    a, b = (draw(probs, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.shape == (4,)


def test_repeated_prompts_share_their_prefill(tmp_path):
    """Rows that repeat a prompt (GRPO's G samples) are prefilled once and copied: greedy decoding gives what
    each row gives alone and what transformers gives for the whole left-padded batch."""
    path, hf = make_checkpoint(tmp_path, "qwen3")
    model = mc.load_model(path)
    a, b = (torch.randint(3, 131, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9))
    rows = [a, b, a, a, b]
    ids, mask = left_pad(rows, pad_token_id=0)
    out = model.generate(ids, max_new_tokens=8, attention_mask=mask)
    for r, row in enumerate(rows):
        assert out[r, -8:].tolist() == model.generate(torch.tensor([row]), max_new_tokens=8)[0, -8:].tolist()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(out, expected)
    # sampling: the same prompt four times gives four rows drawn apart, reproducibly
    draws = [model.generate([a] * 4, 8, temperature=1.0, generator=torch.Generator().manual_seed(1)) for _ in "xy"]
    assert torch.equal(draws[0], draws[1]) and len({tuple(r.tolist()) for r in draws[0]}) > 1


@pytest.mark.parametrize("nh, nkv", [(6, 2), (4, 4), (3, 1)])
def test_decode_attention_equals_sdpa(nh, nkv):
    """One query per row against S keys, grouped query heads, with left padding masked out per row."""
    B, S, hs = 3, 37, 16
    g = torch.Generator().manual_seed(nh)
    q = torch.randn(B, nh, 1, hs, generator=g)
    k, v = torch.randn(B, nkv, S, hs, generator=g), torch.randn(B, nkv, S, hs, generator=g)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., :5] = False
    mask[2, ..., :30] = False
    for m in (None, mask):
        expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m, scale=0.3,
                                                  enable_gqa=True)
        got = decode_attention(q, k, v, m, 0.3)
        assert got.shape == (B, nh, 1, hs) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    assert decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.3).dtype == torch.bfloat16


def test_norm_outputs_are_cast_once_only_without_a_graph():
    h = torch.randn(2, 3, 8)
    assert matmul_input(h) is h  # no autocast: as it is
    with torch.autocast("cpu", torch.bfloat16):
        assert matmul_input(h) is h  # a graph: each matmul casts its own copy, so the grads sum in fp32
        with torch.no_grad():
            assert torch.equal(matmul_input(h), h.bfloat16())


def test_a_cache_with_a_prefix_is_not_taken_by_rows(tmp_path):
    path, _ = make_checkpoint(tmp_path, "smollm")
    config = mc.load_model(path).config
    cache = KVCache(config, 2, 6, torch.float32, "cpu")
    for layer in range(config.num_hidden_layers):
        cache.update(layer, torch.randn(2, config.num_key_value_heads, 3, config.head_dim),
                     torch.randn(2, config.num_key_value_heads, 3, config.head_dim))
    cache.length = 3
    taken = cache.take(torch.tensor([1, 1, 0]))
    assert taken.length == 3 and torch.equal(taken.k[0][2], cache.k[0][0]) and torch.equal(taken.v[0][1], cache.v[0][1])
    kv = torch.zeros(1, config.num_key_value_heads, 2, config.head_dim)
    with_prefix = KVCache(config, 2, 6, torch.float32, "cpu", [Prefix(kv, kv)] * config.num_hidden_layers)
    with pytest.raises(ValueError, match="prefix cannot be re-indexed"):
        with_prefix.take(torch.tensor([0, 1]))
