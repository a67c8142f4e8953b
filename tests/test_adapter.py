"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): invariants, the formula by hand, files and errors.

Exactness: at init W_up = 0 and b_up = 0, so the adapter adds an exact zero (f(·)·0 + 0 = ±0, and
h + ±0 = h), and the model is checked with torch.equal; so are disable_adapters (no adapter code runs),
a save -> load round trip (tensors copied bit for bit), the frozen base after an optimizer step, and cached
against uncached greedy decoding (token ids, not logits).

Tolerance of the formula test (fp32, eps = 1.2e-7): the layer and the hand-written reference compute the
same expression; they may differ only in how the BLAS blocks the dot products (length C = 40 into the
bottleneck, m = 5 out of it, 67 for the base) and where the biases enter (fused addmm against matmul
then add). Each output is a sum of ≤ 67 products of O(1) terms, so a reordering moves it by at most
~67 · eps · |y| ≈ 1e-5 · |y| in the worst case (random-walk estimate √67 · eps ≈ 1e-6 · |y|). Outputs
and gradients are O(1..50), so the bound is relative: rtol 1e-5, atol 1e-5. Measured: 0.0 everywhere
(the same kernels in the same order) but the parallel layer's dL/dx, 2.4e-7 of |dL/dx| ~ 2.4: the MLP's
and the adapter's contributions are summed in another order.
"""

import copy
import json

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file, save_file

import minicustom as mc
from minicustom.config import ModelConfig
from minicustom.methods.base import adapter_layers, find_targets
from minicustom.methods.bottleneck import (
    NONLINEARITIES,
    BottleneckConfig,
    BottleneckLinear,
    ParallelAdapterMLP,
    apply_adapters,
)
from minicustom.methods.lora_layers import LoRALinear
from minicustom.methods.peft_format import PREFIX
from minicustom.model import MLP
from minicustom.quant.linear4bit import Linear4bit, quantize_model

PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]
SITES = {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "pfeiffer": ["mlp.down_proj"], "parallel": ["mlp"]}
KEYS = ["adapter_down.bias", "adapter_down.weight", "adapter_up.bias", "adapter_up.weight"]
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """family -> a tiny random checkpoint folder, written once per module."""
    root, made = tmp_path_factory.mktemp("adapter"), {}

    def get(family):
        if family not in made:
            made[family] = make_checkpoint(root / family, family)[0]
        return made[family]

    return get


def _ids(B=2, T=11, seed=1):
    return torch.randint(3, 131, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _perturb(model, seed=0, std=0.3):
    """Every adapter tensor += std·N(0, 1), in name order: W_up ≠ 0, so the adapters move the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "adapter_" in name:
            p.add_(std * torch.randn(p.shape, generator=g))


def _adapted(path, **kw):
    return apply_adapters(mc.load_model(path), verbose=False, **kw)


# -- invariants ------------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", ["llama3", "smollm", "llama-bias"])
def test_identity_at_init_is_exact(ckpt, family, placement):
    base, ids = mc.load_model(ckpt(family)), _ids()
    model = _adapted(ckpt(family), placement=placement, nonlinearity="gelu")
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))


@pytest.mark.parametrize(("family", "placement", "reduction_factor", "C", "m", "sites"), [
    ("llama3", "houlsby", 16, 64, 4, 4), ("llama3", "pfeiffer", 16, 64, 4, 2),
    ("smollm", "parallel", 8, 72, 9, 2), ("smollm", "houlsby", 5, 72, 14, 4)])
def test_only_adapters_train_and_their_count(ckpt, family, placement, reduction_factor, C, m, sites):
    """Per adapted site W_down (m, C) + b_down (m) + W_up (C, m) + b_up (C) = 2·C·m + m + C, m = C // rf:
    64·4·2 + 4 + 64 = 580, 72·9·2 + 9 + 72 = 1377, 72·14·2 + 14 + 72 = 2102 (72 // 5 = 14)."""
    model = _adapted(ckpt(family), placement=placement, reduction_factor=reduction_factor)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("adapter_" in n for n in trainable)
    assert set(trainable) == {n for n, _ in model.named_parameters() if "adapter_" in n}
    per_site = {}
    for n, p in trainable.items():
        site = n.split(".adapter_")[0]
        per_site[site] = per_site.get(site, 0) + p.numel()
    assert sorted(per_site) == sorted(f"model.layers.{i}.{s}" for i in range(2) for s in SITES[placement])
    assert len(per_site) == sites and set(per_site.values()) == {2 * C * m + m + C}
    assert mc.count_parameters(model)[0] == sites * (2 * C * m + m + C)


def test_frozen_base_is_bit_identical_after_an_adamw_step(ckpt):
    model = _adapted(ckpt("llama-bias"), placement="houlsby")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all parameters: frozen ones too
    ids = _ids()
    torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) == ("adapter_" not in k), k  # the base is unchanged, every adapter tensor moved


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_disable_adapters_is_exactly_the_base(ckpt, placement):
    base, ids = mc.load_model(ckpt("llama3")), _ids()
    model = _adapted(ckpt("llama3"), placement=placement)
    _perturb(model)
    with torch.no_grad():
        assert (model(ids) - base(ids)).abs().max() > 0.1
        with mc.disable_adapters(model):
            assert torch.equal(model(ids), base(ids))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_base_keys_do_not_move(ckpt, placement):
    base = mc.load_model(ckpt("llama-bias")).state_dict()
    model = _adapted(ckpt("llama-bias"), placement=placement).state_dict()
    assert set(base) <= set(model)
    assert all("adapter_" in k for k in set(model) - set(base))
    assert all(torch.equal(model[k], v) for k, v in base.items())


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_cached_generate_equals_an_uncached_greedy_loop(ckpt, placement):
    model = _adapted(ckpt("smollm"), placement=placement, nonlinearity="tanh")
    _perturb(model)
    ids = _ids(T=5)
    out = model.generate(ids, max_new_tokens=8, temperature=0.0)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        with mc.disable_adapters(model):
            assert not torch.equal(model.generate(ids, max_new_tokens=8), seq)  # the adapter matters
    assert torch.equal(out, seq)


# -- the formula, by hand ----------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=11, hidden_size=40, intermediate_size=67, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=20, mlp_bias=True)
    return MLP(config)


@pytest.mark.parametrize("nonlinearity", list(NONLINEARITIES))
@pytest.mark.parametrize("kind", ["linear", "4bit", "parallel"])
def test_layer_matches_the_formula_by_hand(kind, nonlinearity):
    """Sequential: y = h + W_up f(W_down h + b_down) + b_up with h = base(x) of the plain module (nn.Linear
    or Linear4bit); parallel: y = MLP(x) + s (W_up f(W_down x + b_down) + b_up), s = 2.5. Forward, and the
    gradients of x and of every adapter tensor, against autograd on the hand-written expression."""
    torch.manual_seed(1)
    plain = {"linear": lambda: torch.nn.Linear(67, 40), "4bit": lambda: Linear4bit.from_linear(torch.nn.Linear(67, 40)),
             "parallel": _mlp}[kind]()
    config = BottleneckConfig(reduction_factor=8, nonlinearity=nonlinearity, scaling=2.5, init_scale=0.3)
    layer = ParallelAdapterMLP(copy.deepcopy(plain)) if kind == "parallel" else BottleneckLinear(plain)
    layer.add("a", 5, config)
    layer.active = ["a"]
    x = torch.randn(3, 7, 40 if kind == "parallel" else 67, requires_grad=True)
    probe = torch.randn(3, 7, 40)
    (layer(x) * probe).sum().backward()

    params = {k: p.detach().clone().requires_grad_() for k, p in layer.adapter_state("a").items()}
    x_ref = x.detach().clone().requires_grad_()
    f = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
         "tanh": torch.tanh}[nonlinearity]
    h = plain(x_ref) if kind != "parallel" else x_ref
    z = f(h @ params["adapter_down.weight"].T + params["adapter_down.bias"]) @ params["adapter_up.weight"].T \
        + params["adapter_up.bias"]  # (3, 7, 40)
    ref = h + z if kind != "parallel" else plain(x_ref) + 2.5 * z
    (ref * probe).sum().backward()
    torch.testing.assert_close(layer(x), ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=RTOL, atol=ATOL)
    for k, p in layer.adapter_state("a").items():
        torch.testing.assert_close(p.grad, params[k].grad, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
    assert z.abs().max() > 0.1


def test_several_adapters_apply_in_active_order():
    """Sequential adapters stack, y = z_b∘z_a: h1 = h + z_a(h), y = h1 + z_b(h1) (order matters);
    parallel ones sum over the MLP's input, y = MLP(x) + s_a z_a(x) + s_b z_b(x)."""
    torch.manual_seed(2)
    lin, x = torch.nn.Linear(67, 40), torch.randn(2, 3, 67)
    layer = BottleneckLinear(lin)
    for name in "ab":
        layer.add(name, 5, BottleneckConfig(init_scale=0.5, nonlinearity="silu"))
    with torch.no_grad():
        h = lin(x)
        h1 = h + layer.branch("a", h)
        layer.active = ["a", "b"]
        assert torch.equal(layer(x), h1 + layer.branch("b", h1))
        layer.active = ["b", "a"]
        assert not torch.allclose(layer(x), h1 + layer.branch("b", h1))

    mlp, x = _mlp(), torch.randn(2, 3, 40)
    layer = ParallelAdapterMLP(mlp)
    for name, s in (("a", 4.0), ("b", 0.5)):
        layer.add(name, 5, BottleneckConfig(init_scale=0.5, scaling=s))
    layer.active = ["a", "b"]
    with torch.no_grad():
        assert torch.equal(layer(x), mlp(x) + 4.0 * layer.branch("a", x) + 0.5 * layer.branch("b", x))


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_4bit_base(ckpt, placement):
    """On a 4-bit model the sequential adapter wraps Linear4bit (as base_layer), the parallel one an MLP of
    Linear4bit; either is the identity at init, with the adapter in the compute dtype."""
    base = quantize_model(mc.load_model(ckpt("llama3")))
    ids = _ids()
    with torch.no_grad():
        ref = base(ids)
    model = apply_adapters(base, placement=placement, verbose=False)
    layer = model.model.layers[1].mlp if placement == "parallel" else model.model.layers[1].self_attn.o_proj
    assert isinstance(layer.down_proj if placement == "parallel" else layer.base_layer, Linear4bit)
    with torch.no_grad():
        assert torch.equal(model(ids), ref)
    assert mc.count_parameters(model)[0] == {"houlsby": 4, "parallel": 2}[placement] * 580
    _perturb(model)
    with torch.no_grad():
        assert (model(ids) - ref).abs().max() > 0.1


def test_dropout_acts_on_the_adapter_output():
    """Training: y - h = dropout(z), each entry 0 or z / (1 - p) (p = 0.25, over 4·9·40 = 1440 entries the
    kept fraction is 0.75 ± 0.011, so ± 0.06 is > 5σ); eval: the whole z. y - h carries the round-off
    of adding to h ~ 2 (ulp 2.4e-7), hence atol 1e-6."""
    torch.manual_seed(3)
    lin, x = torch.nn.Linear(67, 40), torch.randn(4, 9, 67)
    layer = BottleneckLinear(lin)
    layer.add("a", 5, BottleneckConfig(init_scale=0.5, dropout=0.25))
    layer.active = ["a"]
    with torch.no_grad():
        h, z = lin(x), layer.eval().branch("a", lin(x))
        assert torch.equal(layer(x), h + z)
        d = layer.train()(x) - h
    kept = d != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.06
    torch.testing.assert_close(d[kept], z[kept] / 0.75, rtol=0, atol=1e-6)


# -- files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", ["llama3", "smollm", "llama-bias"])
def test_save_load_round_trip(ckpt, tmp_path, family, placement):
    model = _adapted(ckpt(family), placement=placement, reduction_factor=4, nonlinearity="silu", scaling=1.5)
    _perturb(model)
    mc.save_adapter(model, tmp_path / "adapter")
    fresh = mc.load_adapter(mc.load_model(ckpt(family)), tmp_path / "adapter", adapter_name="other")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    assert fresh.adapter_configs["other"] == model.adapter_configs["default"]
    assert not any(p.requires_grad for p in fresh.parameters())


def test_saved_folder_is_as_documented(ckpt, tmp_path):
    model = _adapted(ckpt("llama3"), placement="houlsby", layers=[1], reduction_factor=8, nonlinearity="gelu",
                     init_scale=0.01, adapter_name="mine")
    mc.save_adapter(model, tmp_path / "a", adapter_name="mine")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(f"{PREFIX}model.layers.1.{s}.{k}" for s in SITES["houlsby"] for k in KEYS)
    assert tensors[f"{PREFIX}model.layers.1.mlp.down_proj.adapter_up.weight"].shape == (64, 8)
    assert tensors[f"{PREFIX}model.layers.1.mlp.down_proj.adapter_down.bias"].shape == (8,)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text()) == {
        "peft_type": "BOTTLENECK_ADAPTER", "reduction_factor": 8, "placement": "houlsby", "nonlinearity": "gelu",
        "scaling": 4.0, "layers": [1], "dropout": 0.0, "init_scale": 0.01, "base_model_name_or_path": None}
    from peft import PeftConfig  # PEFT has no such method and says so, instead of misreading the folder

    with pytest.raises(KeyError, match="BOTTLENECK_ADAPTER"):
        PeftConfig.from_pretrained(str(tmp_path / "a"))


def _edit_tensors(edit):
    def run(folder):
        f = folder / "adapter_model.safetensors"
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f)
    return run


def _edit_config(**fields):
    def run(folder):
        f = folder / "adapter_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), **fields}))
    return run


K = f"{PREFIX}model.layers.0.mlp.down_proj.adapter_up.weight"
BAD_FILES = {
    "shape": (_edit_tensors(lambda t: t.update({K: torch.zeros(64, 5)})), f"{K}: shape (64, 5), expected (64, 4)"),
    "unknown key": (_edit_tensors(lambda t: t.update({K.replace("layers.0", "layers.7"): t[K].clone()})),
                    "model.layers.7.mlp.down_proj.adapter_up.weight: not a tensor of this config's sites"),
    "missing key": (_edit_tensors(lambda t: t.pop(K)), f"{K} is missing"),
    "placement": (_edit_config(placement="serial"), "placement 'serial' is not supported"),
    "nonlinearity": (_edit_config(nonlinearity="swish"), "nonlinearity 'swish' is not supported"),
    "layers": (_edit_config(layers=[0, 5]), "layers [5] do not exist: the model has 2 decoder layers"),
    "reduction": (_edit_config(reduction_factor=0), "reduction_factor must be a positive number, got 0"),
    "no bottleneck": (_edit_config(reduction_factor=100), "reduction_factor 100 leaves no bottleneck"),
    "unknown field": (_edit_config(use_fusion=True), "unknown fields ['use_fusion']"),
    "missing field": (lambda folder: (folder / "adapter_config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((folder / "adapter_config.json").read_text()).items() if k != "scaling"})),
        "missing fields ['scaling']"),
    "placement type": (_edit_config(placement=["houlsby"]), "placement ['houlsby'] is not supported"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_load_errors_name_the_problem_and_leave_the_model_alone(ckpt, tmp_path, case):
    edit, message = BAD_FILES[case]
    mc.save_adapter(_adapted(ckpt("llama3"), placement="houlsby"), tmp_path / "a")
    edit(tmp_path / "a")
    model = mc.load_model(ckpt("llama3"))
    with pytest.raises(mc.AdapterError) as e:
        mc.load_adapter(model, tmp_path / "a")
    file = "adapter_model.safetensors" if case in ("shape", "unknown key", "missing key") else "adapter_config.json"
    assert str(tmp_path / "a" / file) in str(e.value) and message in str(e.value), str(e.value)
    assert not adapter_layers(model) and not getattr(model, "adapter_configs", {})


def test_apply_errors(ckpt):
    path = ckpt("llama3")
    with pytest.raises(ValueError, match="placement 'serial' is not supported; supported: houlsby, pfeiffer"):
        _adapted(path, placement="serial")
    with pytest.raises(ValueError, match="nonlinearity 'swish' is not supported"):
        _adapted(path, nonlinearity="swish")
    with pytest.raises(ValueError, match=r"layers \[3\] do not exist: the model has 2 decoder layers \(0..1\)"):
        _adapted(path, layers=[3])
    model = _adapted(path)
    with pytest.raises(ValueError, match="an adapter named 'default' already exists"):
        apply_adapters(model, verbose=False)
    model = mc.apply_lora(mc.load_model(path), targets=["o_proj"], adapter_name="lora", verbose=False)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.o_proj is a LoRALinear; .* cannot carry two methods"):
        apply_adapters(model, verbose=False)
    assert not any(isinstance(m, BottleneckLinear) for m in model.modules())


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_merge_is_refused(ckpt, placement):
    model = _adapted(ckpt("llama3"), placement=placement)
    for merge in (mc.merge_adapter, mc.merge_lora):
        with pytest.raises(ValueError, match=r"bottleneck adapter is nonlinear \(W_up f\(W_down h\)\) and cannot be "
                                             "merged"):
            merge(model)


# -- composition with LoRA -----------------------------------------------------------------------------

def test_lora_after_a_parallel_adapter_targets_the_mlp_projections(ckpt, tmp_path):
    """The parallel wrapper is transparent: LoRA finds and replaces up_proj inside it, the wrapper calls
    the LoRA layer, LoRA's file keys are the usual ones, both adapters reload, and unloading gives the base."""
    path, ids = ckpt("llama-bias"), _ids()
    base = mc.load_model(path)
    model = _adapted(path, placement="parallel")
    _perturb(model)
    assert {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"} <= set(
        find_targets(model, "all-linear"))
    assert not any("adapter_" in n for n in find_targets(model, "all-linear"))
    with torch.no_grad():
        bottleneck_only = model(ids)
    mc.apply_lora(model, targets=["up_proj"], adapter_name="lora", verbose=False)
    assert isinstance(model.model.layers[0].mlp, ParallelAdapterMLP)
    assert isinstance(model.model.layers[0].mlp.up_proj, LoRALinear)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    mc.set_adapter(model, ["default", "lora"])
    with torch.no_grad():
        both = model(ids)
    assert (both - bottleneck_only).abs().max() > 0.1

    mc.save_adapter(model, tmp_path / "bn", "default")
    mc.save_adapter(model, tmp_path / "lora", "lora")
    assert f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight" in load_file(tmp_path / "lora" / "adapter_model.safetensors")
    fresh = mc.load_adapter(mc.load_model(path), tmp_path / "bn", "default")
    mc.load_adapter(fresh, tmp_path / "lora", "lora")
    mc.set_adapter(fresh, ["default", "lora"])
    with torch.no_grad():
        assert torch.equal(fresh(ids), both)
        plain = mc.unload(model, merge=False)
        assert not adapter_layers(plain) and type(plain.model.layers[0].mlp) is MLP
        assert torch.equal(plain(ids), base(ids))
