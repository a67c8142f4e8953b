"""The model against transformers (test-only oracle) on tiny random checkpoints of every family.

Tolerances: both sides run the same fp32 operations in the same order (RMSNorm in fp32, RoPE tables
in fp32, SDPA), so the logits agree to round-off; the issue's bound is 1e-4 absolute on logits of
magnitude ~7. Cached decoding computes the same sums but with other matmul shapes (T = 1 instead of
T = 19), which changes the BLAS blocking and so the summation order: the bound for a length-n fp32 dot
product is n·eps·|x|, here 88 × 1.2e-7 × 7 ≈ 7e-5, so 1e-4 as well.
"""

import pytest
import torch
from conftest import fused_copy, make_checkpoint

import minicustom as mc
from minicustom.generate import left_pad
from minicustom.model import eval_mode, packed_position_ids


def _ids(B, T, seed=1, vocab=131):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_generate(hf, ids, n, attention_mask=None):
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.generate(ids, attention_mask=attention_mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def test_logits_match_transformers(checkpoint):
    path, hf = checkpoint
    model = mc.load_model(path)
    ids = _ids(3, 29)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_gradients_match_transformers(checkpoint):
    """Backward through every module: the gradient of every parameter equals transformers'."""
    path, hf = checkpoint
    if hf.config.model_type in ("qwen3_moe", "mixtral"):  # transformers' own layout, so every name is the same
        path = fused_copy(path, hf)
    model = mc.load_model(path).train()
    hf.train()
    ids = _ids(2, 17)
    probe = torch.randn(2, 17, 131, generator=torch.Generator().manual_seed(2))
    (model(ids) * probe).sum().backward()
    (hf(ids).logits * probe).sum().backward()
    ours = dict(model.named_parameters())
    theirs = dict(hf.named_parameters())
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, atol=1e-4, rtol=1e-4, msg=name)


def test_greedy_generation_matches_transformers(checkpoint):
    path, hf = checkpoint
    model = mc.load_model(path)
    ids = _ids(2, 11, seed=3)
    out = model.generate(ids, max_new_tokens=20)
    assert out.shape == (2, 31)
    assert torch.equal(out, _hf_generate(hf, ids, 20))


def test_kv_cache_decoding_equals_full_forward(checkpoint):
    """Prefill 9 tokens, then a chunk of 4 with the cache (past > 0, T > 1), then one token at a time."""
    path, _ = checkpoint
    model = mc.load_model(path)
    ids = _ids(2, 19, seed=4)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2, 19)
        parts = [model(ids[:, :9], kv_cache=cache), model(ids[:, 9:13], kv_cache=cache)]
        parts += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(13, 19)]
    assert cache.length == 19
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=0)


def test_left_padded_batch_generation(tmp_path):
    """Rows of different lengths, padded on the left, generate what each row generates alone and what
    transformers generates for the same padded batch."""
    path, hf = make_checkpoint(tmp_path, "smollm")
    model = mc.load_model(path)
    rows = [_ids(1, n, seed=n)[0].tolist() for n in (5, 12, 8)]
    ids, mask = left_pad(rows, pad_token_id=0)
    out = model.generate(ids, max_new_tokens=10, attention_mask=mask)
    for b, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), max_new_tokens=10)
        assert out[b, -10:].tolist() == alone[0, -10:].tolist()
    assert torch.equal(out, _hf_generate(hf, ids, 10, attention_mask=mask))
    # The same through the list-of-rows entry point.
    assert torch.equal(model.generate(rows, max_new_tokens=10), out)


def test_padded_forward_matches_transformers(tmp_path):
    path, hf = make_checkpoint(tmp_path, "qwen2")
    model = mc.load_model(path)
    ids = _ids(2, 13, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos)
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
    assert not ours.isnan().any()
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_packed_sequences_see_only_their_document(tmp_path, family):
    """Three documents packed in one row (block-diagonal causal mask, per-document positions) give the
    logits of each document run alone, in minicustom and in transformers."""
    path, hf = make_checkpoint(tmp_path, family)
    model = mc.load_model(path)
    docs = [_ids(1, n, seed=10 + n) for n in (6, 11, 9)]
    packed = torch.cat(docs, dim=1)  # (1, 26)
    seq_ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    assert packed_position_ids(seq_ids).tolist()[0] == [*range(6), *range(11), *range(9)]
    with torch.no_grad():
        out = model(packed, seq_ids=seq_ids)
        alone = torch.cat([hf(d).logits for d in docs], dim=1)
    torch.testing.assert_close(out, alone, atol=1e-4, rtol=0)


def test_sliding_window_is_honoured(tmp_path):
    """Guard for the Mistral case: without the window the logits move, so the parity test above sees it."""
    path, hf = make_checkpoint(tmp_path / "w", "mistral")
    no_window, _ = make_checkpoint(tmp_path / "nw", "mistral", sliding_window=None)
    ids = _ids(1, 20)
    with torch.no_grad():
        a, b = mc.load_model(path)(ids), mc.load_model(no_window)(ids)
    assert (a[:, :7] - b[:, :7]).abs().max() < 1e-6  # within the window nothing changes
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-2


def test_llama3_rope_scaling_is_honoured(tmp_path):
    path, _ = make_checkpoint(tmp_path / "s", "llama3")
    plain, _ = make_checkpoint(tmp_path / "p", "llama3", rope_scaling=None)
    ids = _ids(1, 20)
    with torch.no_grad():
        assert (mc.load_model(path)(ids) - mc.load_model(plain)(ids)).abs().max() > 1e-2


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    path, _ = make_checkpoint(tmp_path, "qwen3")
    grads = []
    for ckpt in (False, True):
        model = mc.load_model(path).train()
        model.gradient_checkpointing = ckpt
        model(_ids(2, 9)).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=0, rtol=0, msg=name)


def test_tied_embeddings_share_storage(tmp_path):
    path, _ = make_checkpoint(tmp_path, "smollm")
    model = mc.load_model(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_hf_parameter_names(tmp_path):
    path, hf = make_checkpoint(tmp_path, "qwen3")
    assert set(mc.load_model(path).state_dict()) == set(hf.state_dict())


def test_sampling(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    model = mc.load_model(path)
    ids = _ids(2, 6)
    greedy = model.generate(ids, max_new_tokens=8)
    # top_k=1 and a tiny top_p leave only the argmax, whatever the temperature.
    assert torch.equal(model.generate(ids, 8, temperature=1.5, top_k=1), greedy)
    assert torch.equal(model.generate(ids, 8, temperature=1.5, top_p=1e-6), greedy)
    draw = [model.generate(ids, 8, temperature=1.0, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], draw[2])


def test_stop_tokens_end_rows_and_pad(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    model = mc.load_model(path)
    ids = _ids(2, 6)
    free = model.generate(ids, max_new_tokens=12)
    first = free[0, 6 + 2].item()  # stop on row 0's third new token
    out = model.generate(ids, max_new_tokens=12, stop=[first], pad_token_id=0)
    row0 = out[0, 6:].tolist()
    cut = row0.index(first)
    assert row0[:cut + 1] == free[0, 6:6 + cut + 1].tolist()
    assert all(t == 0 for t in row0[cut + 1:])
    # A two-token stop sequence taken from row 1 stops it right after the pair.
    pair = free[1, 8:10].tolist()
    out = model.generate(ids[1:], max_new_tokens=12, stop=[pair])
    assert out[0, -2:].tolist() == pair and out.shape[1] <= 10


def test_bad_inputs(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    model = mc.load_model(path)
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate([[]], max_new_tokens=3)
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="right padding"):
        model.generate(_ids(1, 4), 3, attention_mask=torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_bf16_forward_close_to_fp32(tmp_path):
    """Half-precision path: bf16 weights and activations stay within bf16's resolution of the fp32 logits."""
    path, _ = make_checkpoint(tmp_path, "smollm")
    ids = _ids(1, 16)
    with torch.no_grad():
        ref = mc.load_model(path)(ids)
        half = mc.load_model(path, dtype=torch.bfloat16)(ids)
    assert half.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa; a few roundings through 2 layers -> a few % of the logit scale.
    assert (half.float() - ref).abs().max() < 0.1 * ref.abs().max()



DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_every_available_device(tmp_path, device):
    """Forward, left-padded batched generation and seeded sampling on each device this machine has
    (CUDA where present), against transformers on the CPU and minicustom on the CPU."""
    path, hf = make_checkpoint(tmp_path, "qwen3")
    model = mc.load_model(path, device=device)
    assert {p.device.type for p in model.parameters()} == {device}
    ids = _ids(2, 13)
    with torch.no_grad():
        torch.testing.assert_close(model(ids.to(device)).cpu(), hf(ids).logits, atol=1e-4, rtol=0)
    rows = [_ids(1, n, seed=n)[0].tolist() for n in (4, 9)]
    assert torch.equal(model.generate(rows, max_new_tokens=8).cpu(),
                       mc.load_model(path).generate(rows, max_new_tokens=8))
    g = torch.Generator(device=device).manual_seed(0)
    assert model.generate(ids, 5, temperature=1.0, generator=g).shape == (2, 18)


def test_greedy_tokens_equal_an_uncached_loop(tmp_path):
    """Greedy generation with the KV cache picks the same tokens as re-running the full sequence
    through the model at every step."""
    path, _ = make_checkpoint(tmp_path, "mistral")  # a sliding window, so the cache must honour it too
    model = mc.load_model(path)
    seq = _ids(2, 5, seed=6)
    cached = model.generate(seq, max_new_tokens=15)
    with torch.no_grad():
        for _ in range(15):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("start", [True, False])
def test_eval_mode_turns_dropout_off_and_gives_the_mode_back_even_on_an_error(start):
    block = torch.nn.Sequential(torch.nn.Dropout(0.5))
    block.train(start)
    with eval_mode(block):
        assert not block.training and not block[0].training
        x = torch.ones(64)
        assert torch.equal(block(x), x)
    assert block.training is start and block[0].training is start
    with pytest.raises(RuntimeError, match="boom"), eval_mode(block):
        raise RuntimeError("boom")
    assert block.training is start and block[0].training is start
