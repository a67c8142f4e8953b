"""LLaMA-Adapter against PEFT's adaption prompts (the test-only oracle), zero-init, training, generation.

Prompts are drawn N(0, 1) (as both libraries do) and the gates set to 0.5 + N(0, 0.3²) per layer, so
that the gated softmax moves the logits by O(1).

Tolerances (fp32). Both compute y + g softmax(q K_a^T/√hs) V_a with the same rotated queries and the
same unrotated adapter keys; PEFT recomputes q, multiplies the scores out by hand and applies o_proj to
the adapter term separately (o_proj(y) + o_proj(g ·)), where we add before o_proj (SDPA for the
product): a reassociation of one sum per adapted layer, a few ulps of the logits (|y| ≲ 8, ulp
9.5e-7). Measured up to 6.3e-6 (smollm); asserted atol 1e-5, rtol 1e-6 as for LoRA. Gradients (|g| up to ~100) are
compared divided by their largest entry, atol 1e-5. A gate's gradient is one scalar, a sum over
B·T·C ≈ 1,600 products of both signs that cancel to about a tenth of their absolute sum, so a reordered
sum may move it by ~1,600 · 6e-8 · 10 ≈ 1e-3 relative in the worst case (√n-typical: 2e-5; measured
1.6e-5): relative 1e-4 is asserted. PEFT supports Llama and Mistral here (not Qwen3,
whose head_dim is not hidden / heads), and adds o_proj's bias twice, so the families have no o_proj bias.
"""

import pytest
import torch
from conftest import greedy_uncached, make_checkpoint
from peft import AdaptionPromptConfig, PeftModel, get_peft_model

import minicustom as mc
from minicustom.methods.llama_adapter import apply_llama_adapter

ATOL, RTOL, GATOL = 1e-5, 1e-6, 1e-5
GATE_TOL = 1e-4  # relative; see the module docstring
N = 4


def _ids(B=2, T=11, seed=1):
    return torch.randint(3, 131, (B, T), generator=torch.Generator().manual_seed(seed))


def _ours(tmp_path, family, layers=2, gates=True):
    path, hf = make_checkpoint(tmp_path / "base", family)
    model = mc.load_model(path)
    apply_llama_adapter(model, adapter_len=N, adapter_layers=layers, verbose=False)
    a = model.kv_prefix.adaption["default"]
    if gates:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            a.gate.copy_(0.5 + 0.3 * torch.randn(a.gate.shape, generator=g))
    return model, hf


def _peft(hf, model, layers):
    """PEFT's adaption-prompt model holding our prompts and gates."""
    peft = get_peft_model(hf, AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=N, adapter_layers=layers))
    a = model.kv_prefix.adaption["default"]
    first = model.config.num_hidden_layers - layers
    with torch.no_grad():
        for j in range(layers):
            attn = peft.base_model.model.model.layers[first + j].self_attn
            attn.adaption_prompt.copy_(a.prompt[j][None])
            attn.adaption_gate.copy_(a.gate[j : j + 1])
    return peft


def test_zero_gate_is_exactly_the_base(tmp_path):
    path, _ = make_checkpoint(tmp_path, "smollm")
    model = mc.load_model(path)
    ids = _ids()
    with torch.no_grad():
        base = model(ids)
    apply_llama_adapter(model, adapter_len=N, adapter_layers=2, verbose=False)
    with torch.no_grad():
        assert torch.equal(model(ids), base)  # 0 · anything = 0: exact


@pytest.mark.parametrize("family,layers", [("smollm", 2), ("llama3", 1), ("mistral", 2)])
def test_logits_and_gradients_match_peft(tmp_path, family, layers):
    model, hf = _ours(tmp_path, family, layers)
    peft = _peft(hf, model, layers)
    ids = _ids()
    ours, theirs = model(ids), peft(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    a = model.kv_prefix.adaption["default"]
    first = model.config.num_hidden_layers - layers
    for j in range(layers):
        attn = peft.base_model.model.model.layers[first + j].self_attn
        for ours_g, ref, tol in ((a.prompt.grad[j][None], attn.adaption_prompt.grad, GATOL),
                                 (a.gate.grad[j : j + 1], attn.adaption_gate.grad, GATE_TOL)):
            scale = ref.abs().max()
            torch.testing.assert_close(ours_g / scale, ref / scale, atol=tol, rtol=0)


def test_files_travel_both_ways(tmp_path):
    model, hf = _ours(tmp_path, "smollm")
    peft = _peft(hf, model, 2)
    ids = _ids()
    with torch.no_grad():
        want = model(ids)
    peft.save_pretrained(tmp_path / "peft")
    fresh = mc.load_model(tmp_path / "base")
    mc.load_adapter(fresh, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), want, atol=0, rtol=0)

    mc.save_adapter(model, tmp_path / "ours")
    _, hf2 = make_checkpoint(tmp_path / "base2", "smollm")
    theirs = PeftModel.from_pretrained(hf2, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", ["smollm", "qwen3"])
def test_cached_generation_equals_uncached(tmp_path, family):
    model, _ = _ours(tmp_path, family)
    ids = _ids(B=2, T=5)
    with torch.no_grad():
        want = greedy_uncached(model, ids, 10)
        with mc.disable_adapters(model):
            base = greedy_uncached(model, ids, 10)
    got = model.generate(ids, max_new_tokens=10)
    assert got.tolist() == want.tolist()
    assert got.tolist() != base.tolist()  # the adapter changes the answer


def test_training_touches_only_the_adapter(tmp_path):
    model, _ = _ours(tmp_path, "llama3", gates=False)
    state = {k: v.clone() for k, v in model.state_dict().items() if "kv_prefix" not in k}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"kv_prefix.adaption.default.prompt", "kv_prefix.adaption.default.gate"}
    model.train()
    model.gradient_checkpointing = True
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    model(ids).square().mean().backward()
    a = model.kv_prefix.adaption["default"]
    # at g = 0 only the gate gets a gradient (the prompt's path is multiplied by g), as the paper intends
    assert a.gate.grad.abs().min() > 0 and torch.equal(a.prompt.grad, torch.zeros_like(a.prompt))
    opt.step()
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad(), mc.disable_adapters(model):
        model.eval()
        base = model(ids)
    with torch.no_grad():
        assert not torch.equal(model(ids), base)
    with pytest.raises(ValueError, match="cannot be merged"):
        mc.merge_adapter(model)


def test_bad_files_are_refused(tmp_path):
    model, _ = _ours(tmp_path, "smollm")
    mc.save_adapter(model, tmp_path / "ad")
    import json

    cfg_file = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    fresh = mc.load_model(tmp_path / "base")
    cfg_file.write_text(json.dumps(dict(cfg, adapter_len=5)))
    with pytest.raises(mc.AdapterError, match=r"adaption_prompt: shape \(1, 4, 72\), expected \(1, 5, 72\)"):
        mc.load_adapter(fresh, tmp_path / "ad")
    cfg_file.write_text(json.dumps(dict(cfg, adapter_layers=1)))
    with pytest.raises(mc.AdapterError, match="layers.0.self_attn.adaption_prompt: unexpected key"):
        mc.load_adapter(fresh, tmp_path / "ad")
    assert fresh.kv_prefix is None
