"""Mixture of Experts (Qwen3-MoE, Mixtral) beyond the parity of test_model.py: both expert layouts, the
load-balancing loss against transformers', LoRA on experts by name and on the fused 3-D parameters against
PEFT (files both ways), and the "experts never trained" failure: every expert gets its adapter, and every
expert a token was routed to gets a gradient (the others none).

Tolerances: against transformers' base model, 1e-4 as in test_model.py (the per-expert layout runs each
expert's linears as separate matmuls, transformers one fused gate_up matmul: measured 2.3e-6). LoRA against
PEFT, 1e-5 with rtol 1e-6 as in test_lora_peft.py (both add the same s B_e A_e to the same weights). The
auxiliary loss is a sum of E fp32 products of means: 1e-6. Merging adds s B_e A_e into W_e and unmerging
subtracts the same fp32 product, so W_e comes back within an ulp of |W_e| ~ 1 (1e-6), and the merged forward
sums W_e x instead of W_e x + (x A^T) B^T s: a few ulps of logits ~ 7 per adapted layer, so 1e-4.
"""

import json

import pytest
import torch
from conftest import fused_copy, make_checkpoint

import minicustom as mc
from minicustom.methods.lora_layers import LoRAExperts, LoRALinear
from minicustom.moe import FusedExperts, SparseMoE, load_balancing_loss

ATOL, RTOL = 1e-5, 1e-6


def _ids(B=2, T=17, seed=1):
    return torch.randint(3, 131, (B, T), generator=torch.Generator().manual_seed(seed))


def _fused(path, hf, to):
    return fused_copy(path, hf, to)


@pytest.mark.parametrize("family", ["qwen3moe", "mixtral"])
def test_both_expert_layouts_give_transformers_logits_and_save_as_they_load(tmp_path, family):
    path, hf = make_checkpoint(tmp_path / "hub", family)
    fused = _fused(path, hf, tmp_path / "fused")
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        for folder, is_fused in ((path, False), (fused, True)):
            model = mc.load_model(folder)
            assert model.config.fused_experts == is_fused
            assert any(isinstance(m, FusedExperts) for m in model.modules()) == is_fused
            torch.testing.assert_close(model(ids), ref, atol=1e-4, rtol=0)
            mc.save_model(model, tmp_path / f"saved-{is_fused}")
            import transformers
            again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"saved-{is_fused}").eval()
            torch.testing.assert_close(again(ids).logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen3moe", "mixtral"])
def test_load_balancing_loss_equals_transformers(tmp_path, family):
    """With output_router_logits, transformers returns aux_loss; ours over our routers' logits, with and
    without padding, is the same number."""
    path, hf = make_checkpoint(tmp_path, family)
    model = mc.load_model(path)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    for attention_mask in (None, mask):
        with torch.no_grad():
            model(ids, attention_mask=attention_mask)
            routers = [m.router_logits for m in model.modules() if isinstance(m, SparseMoE)]
            ours = load_balancing_loss(routers, model.config.num_experts_per_tok, attention_mask)
            theirs = hf(ids, attention_mask=attention_mask, output_router_logits=True).aux_loss
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_every_expert_gets_its_adapter_and_a_gradient_when_routed_to(tmp_path):
    """LoRA on all-linear of a per-expert checkpoint adapts each expert's three linears (and not the router).
    One token routes to k experts: exactly those experts' lora_B get a gradient (B starts at zero, so A gets
    none yet); the whole batch reaches every expert, and every expert's adapter then has a gradient."""
    path, _ = make_checkpoint(tmp_path, "qwen3moe")
    model = mc.load_model(path)
    mc.apply_lora(model, r=4, alpha=8, verbose=False)
    moe = model.model.layers[0].mlp
    assert all(isinstance(getattr(e, n), LoRALinear) for e in moe.experts for n in ("gate_proj", "up_proj", "down_proj"))
    assert len(moe.experts) == 4 and sum(isinstance(m, LoRALinear) for m in moe.modules()) == 4 * 3
    one = _ids(1, 1)
    model(one).sum().backward()
    chosen = set(moe.router_logits.topk(2, dim=-1).indices[0].tolist())
    for e, expert in enumerate(moe.experts):
        got = expert.down_proj.lora_B["default"].weight.grad
        assert (got is not None and got.abs().sum() > 0) == (e in chosen), (e, chosen)
    model.zero_grad()
    model(_ids()).sum().backward()
    assert set(moe.router_logits.topk(2, dim=-1).indices.flatten().tolist()) == {0, 1, 2, 3}
    for e, expert in enumerate(moe.experts):
        for n in ("gate_proj", "up_proj", "down_proj"):
            assert getattr(expert, n).lora_B["default"].weight.grad.abs().sum() > 0, (e, n)


def _perturb(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_lora_on_fused_expert_parameters_matches_peft_target_parameters_both_ways(tmp_path):
    """PEFT's target_parameters on transformers' 3-D experts, and ours on a fused checkpoint, with the same
    A and B (PEFT's layout: A (E r, in), B (out, r E)): the same logits; each folder loads in the other."""
    from peft import LoraConfig, PeftModel, get_peft_model

    path, hf = make_checkpoint(tmp_path / "hub", "qwen3moe")
    fused = _fused(path, hf, tmp_path / "fused")
    params = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=params))
    _perturb(peft)
    peft.save_pretrained(tmp_path / "theirs")
    model = mc.load_adapter(mc.load_model(fused), tmp_path / "theirs", is_trainable=True).eval()
    layer = model.model.layers[0].mlp.experts
    assert isinstance(layer, LoRAExperts) and layer.order["default"] == ["gate_up_proj", "down_proj"]
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(out, peft.eval()(input_ids=ids).logits, atol=ATOL, rtol=RTOL)
        with mc.disable_adapters(model):
            assert (model(ids) - out).abs().max() > 0.1

    # Gradients of every expert's A and B (train mode; PEFT's nesting: gate_up_proj inside, down_proj outside).
    model.train()
    peft.train()
    probe = torch.randn(2, 17, 131, generator=torch.Generator().manual_seed(3))
    (model(ids) * probe).sum().backward()
    (peft(input_ids=ids).logits * probe).sum().backward()
    theirs = dict(peft.named_parameters())
    for layer_name in ("model.layers.0.mlp.experts",):  # layer 1 is dense (mlp_only_layers)
        for p, where in (("gate_up_proj", ".base_layer"), ("down_proj", "")):
            for f in ("lora_A", "lora_B"):
                g = model.get_submodule(layer_name).__getattr__(f)["default"][p].grad
                ref = theirs[f"base_model.model.{layer_name}{where}.{f}.default.weight"].grad
                scale = ref.abs().max()
                torch.testing.assert_close(g / scale, ref / scale, atol=1e-5, rtol=0, msg=f"{layer_name} {p} {f}")

    ours = mc.apply_lora(mc.load_model(fused), r=4, alpha=8, targets=[], target_parameters=params, verbose=False)
    _perturb(ours)
    mc.save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == sorted(params) and saved["target_modules"] == []
    _, fresh = make_checkpoint(tmp_path / "again", "qwen3moe")
    in_peft = PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(in_peft(input_ids=ids).logits, ours.eval()(ids), atol=ATOL, rtol=RTOL)


def test_lora_on_experts_by_name_loads_in_peft(tmp_path):
    """A per-expert adapter (PEFT target_modules on each expert's linears, as with transformers 4) loads in
    PEFT on transformers 5, which converts it to its fused experts (A stacked, B block-diagonal): the same
    logits. Every layer sparse here: PEFT 0.21's conversion drops the same names' LoRA on a dense layer's
    MLP (measured: layer 1's mlp.gate_proj left a plain Linear when mlp_only_layers=[1])."""
    from peft import PeftModel

    path, _ = make_checkpoint(tmp_path / "hub", "qwen3moe", mlp_only_layers=[])
    model = mc.apply_lora(mc.load_model(path), r=4, alpha=8, targets=["gate_proj", "up_proj", "down_proj"],
                          verbose=False)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 4 * 3  # layers x experts x linears
    _perturb(model)
    mc.save_adapter(model, tmp_path / "ours")
    _, fresh = make_checkpoint(tmp_path / "again", "qwen3moe", mlp_only_layers=[])
    peft = PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, model.eval()(ids), atol=ATOL, rtol=RTOL)


def test_fused_expert_lora_merges_and_unmerges(tmp_path):
    path, hf = make_checkpoint(tmp_path / "hub", "mixtral")
    model = mc.apply_lora(mc.load_model(_fused(path, hf, tmp_path / "fused")), r=4, alpha=8, targets=[],
                          target_parameters=["experts.gate_up_proj", "experts.down_proj"], verbose=False)
    _perturb(model)
    ids = _ids()
    layer = model.model.layers[0].mlp.experts  # fused: under mlp, as transformers >= 5 names it
    W0 = layer.gate_up_proj.detach().clone()
    with torch.no_grad():
        before = model(ids)
        mc.merge_adapters(model)  # the weights themselves now carry the update
        assert (layer.gate_up_proj - W0).abs().max() > 1e-3
        torch.testing.assert_close(model(ids), before, atol=1e-4, rtol=0)
        mc.unmerge_adapters(model)
        torch.testing.assert_close(layer.gate_up_proj, W0, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=0)


def test_sft_adds_the_load_balancing_loss(tmp_path):
    """train's SFT loss on a MoE model: coef * aux per trained token, reported as aux_loss."""
    from minicustom.train.sft import SFTLoss

    path, _ = make_checkpoint(tmp_path, "qwen3moe")
    model = mc.load_model(path)
    ids = _ids()
    labels = ids.clone()
    plain, stats = SFTLoss(model, 512, 0.0)(ids, labels)
    assert stats == {}
    assert SFTLoss(model, 512).aux_coef == 0.0  # the config has no output_router_logits: transformers adds none
    model.config.output_router_logits = True
    assert SFTLoss(model, 512).aux_coef == model.config.router_aux_loss_coef == 0.001
    with_aux, stats = SFTLoss(model, 512, 0.5)(ids, labels)
    n = ids.numel() - ids.shape[0]  # the next-token targets
    routers = [m.router_logits for m in model.modules() if isinstance(m, SparseMoE)]
    aux = load_balancing_loss(routers, 2)
    # the sum of n token losses plus 0.5 aux n: fp32 sums of ~ n * 5, so a relative 1e-6 bound
    torch.testing.assert_close(with_aux, plain + 0.5 * aux * n, atol=0, rtol=1e-6)
    torch.testing.assert_close(stats["aux_loss"] / n, aux.detach(), atol=1e-6, rtol=0)
