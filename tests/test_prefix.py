"""Prefix tuning against PEFT (the test-only oracle), and in training and cached generation.

Weights are made identical by name (our PrefixEncoder has PEFT's `embedding` / `transform` layout) and
drawn with std 0.5 so that the prefix keys take a real share of every softmax and values move the
logits by O(1): a wrong key/value order, a head split of the wrong width or an unshifted position
shows far above round-off.

Tolerances (fp32). The model is bitwise transformers' (tests/test_model.py), and the prefix enters
the same way in both: [P_k; K] under one softmax, with the tokens at positions P.. . The differences
are in the projection MLP, which runs on (P, D) here and on (B, P, D) in PEFT (another matmul
blocking): measured 0.0 without the projection and up to 5.1e-6 with it, a few ulps of the logits
(|y| ≲ 8, ulp 9.5e-7). We assert atol 1e-5, rtol 1e-6, as the LoRA parity tests. Gradients w.r.t. the prefix parameters are sums over
B·T positions and reach |g| ~ 10-100; they are compared divided by their largest entry, atol 1e-5.
"""

import pytest
import torch
from conftest import greedy_uncached, make_checkpoint
from peft import PeftModel, PrefixTuningConfig, get_peft_model

import minicustom as mc
from minicustom.methods.prefix import ENCODER_FILE, apply_prefix

ATOL, RTOL, GATOL = 1e-5, 1e-6, 1e-5
P = 5


def _ids(B=2, T=13, seed=1):
    return torch.randint(3, 131, (B, T), generator=torch.Generator().manual_seed(seed))


def _randomize(module, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))


def _pair(tmp_path, family, projection, hidden=None):
    """(ours, PEFT's) prefix-tuned models with the same random base and the same prefix weights."""
    path, hf = make_checkpoint(tmp_path / "base", family)
    model = mc.load_model(path)
    apply_prefix(model, num_virtual_tokens=P, projection=projection, encoder_hidden_size=hidden, verbose=False)
    encoder = model.kv_prefix.prefix_encoder["default"]
    _randomize(encoder)
    peft = get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                 prefix_projection=projection, encoder_hidden_size=hidden))
    peft.prompt_encoder["default"].load_state_dict(encoder.state_dict())
    return model, peft


@pytest.mark.parametrize("family,projection", [("smollm", False), ("smollm", True), ("llama3", False),
                                               ("qwen3", True), ("mistral", False)])
def test_logits_and_gradients_match_peft(tmp_path, family, projection):
    model, peft = _pair(tmp_path, family, projection, hidden=24 if projection else None)
    ids = _ids()
    ours = model(ids)
    theirs = peft(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)

    ours.square().mean().backward()
    theirs.square().mean().backward()
    ours_g = dict(model.kv_prefix.prefix_encoder["default"].named_parameters())
    for name, p in peft.prompt_encoder["default"].named_parameters():
        g, ref = ours_g[name].grad, p.grad
        scale = ref.abs().max()
        torch.testing.assert_close(g / scale, ref / scale, atol=GATOL, rtol=0, msg=name)


def test_attention_mask_pads_the_tokens_not_the_prefix(tmp_path):
    """PEFT prepends ones to the attention mask; ours covers the tokens only and the model adds them."""
    model, peft = _pair(tmp_path, "smollm", False)
    ids = _ids(B=2, T=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in row 0
    ours = model(ids, attention_mask=mask)
    theirs = peft(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[0, 3:], theirs[0, 3:], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours[1], theirs[1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("projection", [False, True])
def test_files_travel_both_ways(tmp_path, projection):
    model, peft = _pair(tmp_path, "smollm", projection, hidden=24 if projection else None)
    ids = _ids()
    with torch.no_grad():
        want = model(ids)

    peft.save_pretrained(tmp_path / "peft")
    fresh = mc.load_model(tmp_path / "base")
    mc.load_adapter(fresh, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), want, atol=ATOL, rtol=RTOL)

    mc.save_adapter(model, tmp_path / "ours")
    assert (tmp_path / "ours" / ENCODER_FILE).exists() == projection
    _, hf = make_checkpoint(tmp_path / "base2", "smollm")
    theirs = PeftModel.from_pretrained(hf, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=ATOL, rtol=RTOL)

    # with the encoder file, training resumes on the encoder itself, not on its output
    again = mc.load_model(tmp_path / "base")
    mc.load_adapter(again, tmp_path / "ours", is_trainable=True)
    names = {n for n, p in again.named_parameters() if p.requires_grad}
    assert any(".transform." in n for n in names) == projection
    with torch.no_grad():
        torch.testing.assert_close(again(ids), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", ["smollm", "mistral"])
def test_cached_generation_equals_uncached(tmp_path, family):
    model, _ = _pair(tmp_path, family, True, hidden=24)
    ids = _ids(B=2, T=6)
    with torch.no_grad():
        want = greedy_uncached(model, ids, 10)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=10), want, atol=0, rtol=0)
    cache = model.new_kv_cache(2, 16)
    assert cache.prefix_length == P and cache.length == P
    if family == "mistral":
        return  # a sliding window counts cache slots, so left padding shifts it (as in transformers)
    # a left-padded batch generates each row as it would alone
    rows = [ids[0, :3].tolist(), ids[1].tolist()]
    out = model.generate(rows, max_new_tokens=6)
    alone = model.generate(torch.tensor([rows[0]]), max_new_tokens=6)
    assert out[0, 3:].tolist() == alone[0].tolist()


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    model, _ = _pair(tmp_path, "smollm", True, hidden=24)
    model.train()
    ids = _ids()
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        model(ids).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=0, rtol=0, msg=n)


def test_packed_rows_see_the_prefix_and_their_own_document(tmp_path):
    model, _ = _pair(tmp_path, "llama3", False)
    a, b = _ids(1, 5, seed=2), _ids(1, 7, seed=3)
    seq_ids = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), seq_ids=seq_ids)
        torch.testing.assert_close(packed[:, :5], model(a), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(packed[:, 5:], model(b), atol=ATOL, rtol=RTOL)


def test_only_prefix_trains_and_the_base_is_untouched(tmp_path):
    path, _ = make_checkpoint(tmp_path, "smollm")
    model = mc.load_model(path)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    with torch.no_grad():
        base_logits = model(ids)
    apply_prefix(model, num_virtual_tokens=P, projection=True, verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("kv_prefix.prefix_encoder.default.") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids).square().mean().backward()
    opt.step()
    for k, v in base_state.items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad(), mc.disable_adapters(model):
        assert torch.equal(model(ids), base_logits)
    with torch.no_grad():
        assert not torch.allclose(model(ids), base_logits)
    merged = mc.merge_adapter  # a prefix has no weight to fold into
    with pytest.raises(ValueError, match="cannot be merged"):
        merged(model)


def test_bad_files_are_refused_before_the_model_changes(tmp_path):
    model, _ = _pair(tmp_path, "smollm", False)
    mc.save_adapter(model, tmp_path / "ad")
    fresh = mc.load_model(tmp_path / "base")

    import json

    from safetensors.torch import load_file, save_file
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    bad = dict(cfg, num_layers=7)
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(bad))
    with pytest.raises(mc.AdapterError, match="num_layers=7"):
        mc.load_adapter(fresh, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    save_file({"prompt_embeddings": t["prompt_embeddings"][:, :-1].contiguous()}, tmp_path / "ad" / "adapter_model.safetensors")
    with pytest.raises(mc.AdapterError, match="prompt_embeddings has shape"):
        mc.load_adapter(fresh, tmp_path / "ad")
    save_file({"prompt_embeddings": t["prompt_embeddings"], "extra": t["prompt_embeddings"].clone()},
              tmp_path / "ad" / "adapter_model.safetensors")
    with pytest.raises(mc.AdapterError, match="extra"):
        mc.load_adapter(fresh, tmp_path / "ad")
    assert fresh.kv_prefix is None and not getattr(fresh, "adapter_configs", {})
