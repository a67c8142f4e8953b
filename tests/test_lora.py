"""LoRA invariants, formulas and errors (PEFT parity lives in test_lora_peft.py).

Exactness: with B = 0 the LoRA branch adds an exact zero, and DoRA's m / ||W0|| is exactly 1 (m is that
same norm), so identity at init is checked with zero tolerance. Merging reorders a sum
(W0 x + s B A x versus (W0 + s B A) x): fp32 round-off of a length-64..88 dot product, n·eps·|y| with
|y| ~ 5 gives ~5e-5, so 1e-4 on logits; merge -> unmerge restores W0 to round-off of |W0| + |ΔW| ~ 1:
a few ulps, 1e-6.
"""

import json

import pytest
import torch
from conftest import adamw_step_changes, disabled_is_the_base, make_checkpoint
from safetensors.torch import load_file, save_file

import minicustom as mc
from minicustom.methods.lora_layers import LoRAEmbedding, LoRALinear


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "base", "llama-bias")[0]


def _ids(B=2, T=11, seed=1):
    return torch.randint(3, 131, (B, T), generator=torch.Generator().manual_seed(seed))


def _randomize_lora(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(std * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kw", [{}, {"use_rslora": True}, {"use_dora": True}, {"init": "gaussian"},
                                {"targets": ["embed_tokens", "q_proj"]}])
def test_identity_at_init_is_exact(ckpt, kw):
    base = mc.load_model(ckpt)
    model = mc.apply_lora(mc.load_model(ckpt), r=4, alpha=8, **{"targets": "all-linear", **kw})
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_leave_the_model_unchanged_at_init(ckpt, init):
    base = mc.load_model(ckpt)
    model = mc.apply_lora(mc.load_model(ckpt), r=4, alpha=8, init=init)
    ids = _ids()
    with torch.no_grad():  # W_res + s B0 A0 reassociates W0: round-off only
        torch.testing.assert_close(model(ids), base(ids), atol=1e-4, rtol=0)
    layer = model.model.layers[0].self_attn.q_proj
    assert not torch.equal(layer.lora_B["default"].weight, torch.zeros_like(layer.lora_B["default"].weight))


def test_formulas_by_hand():
    """y = W0 x + b + s B A x, s = alpha / r (rsLoRA: alpha / √r); DoRA y = (m / ||W0 + sBA||_row)(W0 x + sBAx) + b."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(13, 7)
    x = torch.randn(3, 5, 13)
    for use_rslora, use_dora, s in ((False, False, 6 / 3), (True, False, 6 / 3 ** 0.5), (False, True, 6 / 3)):
        layer = LoRALinear(lin)
        layer.add("a", 3, 6.0, mc.LoraConfig(r=3, alpha=6.0, use_rslora=use_rslora, use_dora=use_dora))
        layer.active = ["a"]
        A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
        with torch.no_grad():
            B.normal_()
        W = lin.weight + s * B @ A
        if use_dora:
            with torch.no_grad():
                layer.lora_magnitude_vector["a"].mul_(1.5)
            m = layer.lora_magnitude_vector["a"]
            expected = (x @ W.T) * (m / W.norm(dim=1)) + lin.bias
        else:
            expected = x @ W.T + lin.bias
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_embedding_lora_formula():
    emb = torch.nn.Embedding(17, 6)
    layer = LoRAEmbedding(emb)
    layer.add("a", 2, 4.0, mc.LoraConfig(r=2, alpha=4.0))
    layer.active = ["a"]
    assert torch.equal(layer.lora_embedding_A["a"], torch.zeros(2, 17))  # A zero, B normal (PEFT)
    with torch.no_grad():
        layer.lora_embedding_A["a"].normal_()
    x = torch.tensor([[0, 5, 16]])
    A, B = layer.lora_embedding_A["a"], layer.lora_embedding_B["a"]
    torch.testing.assert_close(layer(x), emb.weight[x] + 2.0 * (A.T[x] @ B.T), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}, {"use_rslora": True}])
def test_merge_equivalence_and_unmerge_restores_w0(ckpt, kw):
    model = mc.apply_lora(mc.load_model(ckpt), r=4, alpha=8, **kw)
    _randomize_lora(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
        mc.merge_lora(model)
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, w0["model.layers.0.mlp.up_proj.weight"])
        torch.testing.assert_close(model(ids), before, atol=1e-4, rtol=0)
        mc.unmerge_lora(model)
        torch.testing.assert_close(model(ids), before, atol=1e-4, rtol=0)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            torch.testing.assert_close(p, w0[n], atol=1e-6, rtol=0, msg=n)


def test_merge_adapter_gives_plain_modules_and_base_keys(ckpt):
    base_keys = set(mc.load_model(ckpt).state_dict())
    model = mc.apply_lora(mc.load_model(ckpt), r=4, alpha=8, use_dora=True)
    _randomize_lora(model)
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
        plain = mc.merge_adapter(model)
        torch.testing.assert_close(plain(ids), before, atol=1e-4, rtol=0)
    assert set(plain.state_dict()) == base_keys
    assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_base_bit_identical_after_an_optimizer_step(ckpt):
    model = mc.apply_lora(mc.load_model(ckpt), r=4, alpha=8, use_dora=True, modules_to_save=["lm_head"]).train()
    changed = adamw_step_changes(model, _ids())
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert any("lora_magnitude_vector" in n for n in changed)
    assert "lm_head.modules_to_save.default.weight" in changed


def test_only_adapter_parameters_are_trainable(ckpt, capsys):
    model = mc.apply_lora(mc.load_model(ckpt), r=4, alpha=8, targets=["q_proj", "v_proj"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    trainable, total = mc.count_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable parameters {trainable:,} of {total:,}" in capsys.readouterr().out


def test_disable_adapters_is_exactly_the_base(ckpt):
    base = mc.load_model(ckpt)
    model = mc.apply_lora(mc.load_model(ckpt), r=4, alpha=8, use_dora=True, modules_to_save=["lm_head"])
    _randomize_lora(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.add_(1.0)
    disabled_is_the_base(model, base, _ids())
    with torch.no_grad():
        mc.merge_lora(model)
        with pytest.raises(ValueError, match="merged into the base weights"), mc.disable_adapters(model):
            pass


def test_several_named_adapters(ckpt):
    model = mc.load_model(ckpt)
    ids = _ids()
    mc.apply_lora(model, r=4, alpha=8, adapter_name="a", verbose=False)
    mc.apply_lora(model, r=2, alpha=2, targets=["q_proj"], adapter_name="b", verbose=False)
    _randomize_lora(model)
    with torch.no_grad():
        mc.set_adapter(model, "a")
        out_a = model(ids)
        assert all("lora_A.a" in n or "lora_B.a" in n for n, p in model.named_parameters() if p.requires_grad)
        mc.set_adapter(model, "b")
        out_b = model(ids)
        assert not torch.allclose(out_a, out_b)
        mc.set_adapter(model, ["a", "b"])  # both at once: the deltas add
        q = model.model.layers[0].self_attn.q_proj
        x = torch.randn(3, 64)
        ref = torch.nn.functional.linear(x, q.weight + q.delta("a") + q.delta("b"), q.bias)
        torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=0)
        mc.delete_adapter(model, "b")
        assert "b" not in q.adapters and q.active == ["a"]
        mc.set_adapter(model, "a")
        assert torch.equal(model(ids), out_a)
    with pytest.raises(ValueError, match="no adapter named"):
        mc.set_adapter(model, "b")
    with pytest.raises(ValueError, match="already exists"):
        mc.apply_lora(model, adapter_name="a")


def test_weighted_cat_combination_is_exact(ckpt):
    """cat: ΔW = Σ w_i s_i B_i A_i exactly, at rank Σ r_i."""
    model = mc.load_model(ckpt)
    mc.apply_lora(model, r=4, alpha=8, adapter_name="a", verbose=False)
    mc.apply_lora(model, r=2, alpha=6, adapter_name="b", verbose=False)
    _randomize_lora(model)
    mc.add_weighted_adapter(model, ["a", "b"], [0.7, -0.4], "ab", combination="cat")
    q = model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(q.delta("ab"), 0.7 * q.delta("a") - 0.4 * q.delta("b"), atol=1e-6, rtol=0)
    assert q.lora_A["ab"].weight.shape[0] == 6
    with pytest.raises(ValueError, match="equal rank"):
        mc.add_weighted_adapter(model, ["a", "b"], [1, 1], "lin", combination="linear")


def test_lora_plus_groups(ckpt):
    model = mc.apply_lora(mc.load_model(ckpt), r=4, alpha=8, use_dora=True, verbose=False)
    groups = mc.lora_plus_param_groups(model, lr=1e-4, ratio=16, weight_decay=0.01)
    by_lr = {g["lr"]: g for g in groups if g["weight_decay"] > 0}
    assert {id(p) for p in by_lr[1e-4 * 16]["params"]} == {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
    assert all(p.ndim == 2 for g in groups if g["weight_decay"] > 0 for p in g["params"])
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable


def test_targets_regex_layers_and_errors(ckpt):
    model = mc.apply_lora(mc.load_model(ckpt), targets=r"model\.layers\.\d+\.mlp\.(up|down)_proj", verbose=False)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("down", "up")]
    model = mc.apply_lora(mc.load_model(ckpt), targets="all-linear", layers=[1], verbose=False)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 7 and all(n.startswith("model.layers.1.") for n in wrapped)
    assert "lm_head" not in wrapped
    with pytest.raises(ValueError, match="match no module; linear modules are named like .*q_proj"):
        mc.apply_lora(mc.load_model(ckpt), targets=["qkv"])
    with pytest.raises(ValueError, match="init 'loftq' is not supported"):
        mc.apply_lora(mc.load_model(ckpt), init="loftq")


def test_gradient_checkpointing_with_lora(ckpt):
    grads = []
    for ckpt_on in (False, True):
        torch.manual_seed(0)  # the same A init in both runs
        model = mc.apply_lora(mc.load_model(ckpt), r=4, alpha=8, use_dora=True, verbose=False).train()
        _randomize_lora(model)
        model.gradient_checkpointing = ckpt_on
        model(_ids()).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=0, rtol=0, msg=n)


# -- adapter files ------------------------------------------------------------------------------------

@pytest.fixture
def saved(ckpt, tmp_path):
    model = mc.apply_lora(mc.load_model(ckpt), r=4, alpha=8, use_dora=True, verbose=False)
    _randomize_lora(model)
    mc.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_save_load_round_trip(ckpt, saved):
    model, path = saved
    loaded = mc.load_adapter(mc.load_model(ckpt), path)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = mc.load_adapter(mc.load_model(ckpt), path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    config = json.loads((path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_dora"]) == ("LORA", 4, 8, True)
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    keys = load_file(path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert not list(path.glob("*.tmp"))


def test_wrong_rank_in_file(ckpt, saved):
    _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    config["r"] = 8
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(mc.AdapterError, match=r"q_proj: rank 4 in adapter_model.safetensors but r=8"):
        mc.load_adapter(mc.load_model(ckpt), path)


def test_wrong_shape_in_file(ckpt, saved):
    _, path = saved
    state = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    state[key] = torch.zeros(5, 4)
    save_file(state, path / "adapter_model.safetensors")
    with pytest.raises(mc.AdapterError, match=r"up_proj.lora_B.weight: shape \(5, 4\), expected \(88, 4\)"):
        mc.load_adapter(mc.load_model(ckpt), path)


def test_adapter_for_another_base(saved, tmp_path):
    _, path = saved
    other, _ = make_checkpoint(tmp_path / "other", "llama-bias", hidden_size=32, num_attention_heads=2,
                               num_key_value_heads=2)
    model = mc.load_model(other)
    with pytest.raises(mc.AdapterError, match=r"trained on another base \(llama hidden=64 .*this model is llama hidden=32"):
        mc.load_adapter(model, path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # untouched


def test_keys_that_match_no_module(ckpt, saved):
    _, path = saved
    state = load_file(path / "adapter_model.safetensors")
    state["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(state, path / "adapter_model.safetensors")
    model = mc.load_model(ckpt)
    with pytest.raises(mc.AdapterError, match=r"1 keys match no module of this model: .*qkv_proj\.lora_A\.weight"):
        mc.load_adapter(model, path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # never a partial load


def test_corrupt_and_missing_files(ckpt, saved):
    _, path = saved
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(mc.AdapterError, match=r"adapter_model\.safetensors: cannot read safetensors file"):
        mc.load_adapter(mc.load_model(ckpt), path)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        mc.load_adapter(mc.load_model(ckpt), path)
    (path / "adapter_config.json").write_text('{"peft_type": "LORA",\n "r": }')
    with pytest.raises(mc.AdapterError, match=r"adapter_config\.json: not valid JSON \(line 2"):
        mc.load_adapter(mc.load_model(ckpt), path)
    (path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        mc.load_adapter(mc.load_model(ckpt), path)


def test_unsupported_peft_type_and_fields(ckpt, saved):
    _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "FOURIERFT"}))
    with pytest.raises(NotImplementedError, match="peft_type 'FOURIERFT' is not supported; supported: .*LORA"):
        mc.load_adapter(mc.load_model(ckpt), path)
    (path / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    with pytest.raises(mc.AdapterError, match="fan_in_fan_out=True is not supported"):
        mc.load_adapter(mc.load_model(ckpt), path)
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(mc.AdapterError, match="lora_magnitude_vector is not used by this config"):
        mc.load_adapter(mc.load_model(ckpt), path)
