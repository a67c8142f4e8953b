"""IA3: invariants, the formula, PEFT parity (logits, gradients, merging, folders both ways), errors.

Vectors are set to l = 1 + 0.3·N(0, 1) (in name order, so two models with the same names get the same
values): every entry moves its channel by ~30%, so the logits move by O(1) (checked) and a vector on the
wrong side of a layer, a missing bias scaling or a transposed shape shows far above round-off.

Exactness and tolerances (fp32; eps = 1.2e-7):
- Identity at init and disabled adapters: l = 1 multiplies exactly, and a layer with no active adapter
  does not multiply at all, so both equal the base bit for bit (zero tolerance).
- PEFT parity: both sides evaluate the same expressions in the same order (F.linear(x, W, b) then
  · l; or F.linear(x · l, W, b); several adapters: ((1 · l_a) · l_b) first), so IA3 adds no difference
  beyond the base models' own (bitwise equal here; measured 0.0 on logits and gradients in all six
  families). The tolerances are the LoRA parity ones (tests/test_lora_peft.py): logits atol 1e-5,
  rtol 1e-6; gradients divided by their largest entry, atol 1e-5.
- Merging: (l ⊙ W) x against l ⊙ (W x) (or W (l ⊙ x)) rounds every product once more, so each merged
  linear's output moves within the fp32 bound of its length-64..88 dot product, n·eps·|y|; with |y| ~ 7
  that is 88 · 1.2e-7 · 7 ≈ 7e-5, hence 1e-4 on logits, the LoRA merge bound (tests/test_lora.py;
  measured ≤ 1.9e-5 over the six families, default targets and all-linear).
  Merge/unmerge use PEFT's formulas (unmerge: W / (l + 1e-8)), so the weights equal PEFT's bit for bit;
  unmerge restores W to a couple of ulps of |W| ≲ 1: 1e-6 (measured 1.2e-7).
- Folders: saving and loading copy the vectors bit for bit, so minicustom -> minicustom is exact and
  PEFT <-> minicustom keeps the parity tolerance.
"""

import json

import peft_parity as pp
import pytest
import torch
from conftest import adamw_step_changes, make_checkpoint, token_ids
from peft import IA3Config, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import minicustom as mc
from minicustom.methods.ia3 import IA3Linear
from minicustom.quant import linear4bit

ATOL, RTOL = 1e-5, 1e-6  # logits against PEFT
GATOL = 1e-5  # gradients against PEFT, divided by their largest entry
MERGE_ATOL = 1e-4
# Every ia3_l := 1 + 0.3·N(0, 1).
IA3 = pp.Method("IA3", "ia3", mc.apply_ia3, IA3Config, IA3Linear, (".ia3_l.",), pp.normal(0.3, mean=1.0))


def _layers(model, adapter="default") -> dict[str, tuple[bool, tuple[int, ...]]]:
    """{module name: (is_feedforward, shape of l)} of every IA3 layer holding `adapter`, PEFT's mapped to ours."""
    return {n.removeprefix(pp.PREFIX): (m.is_feedforward, tuple(m.ia3_l[adapter].shape))
            for n, m in model.named_modules() if hasattr(m, "ia3_l") and adapter in m.ia3_l}


def _peft(hf, adapter_name="default", **kw):
    return get_peft_model(hf, IA3Config(task_type="CAUSAL_LM", **kw), adapter_name=adapter_name)


@pytest.fixture
def llama_bias_ckpt(tmp_path):
    return make_checkpoint(tmp_path / "base", "llama-bias")[0]


# -- invariants and the formula --------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"targets": "all-linear", "feedforward": ["down_proj", "up_proj"]}])
def test_identity_at_init_is_exact(llama_bias_ckpt, kw):
    base = mc.load_model(llama_bias_ckpt)
    model = mc.apply_ia3(mc.load_model(llama_bias_ckpt), verbose=False, **kw)
    assert all(torch.equal(p, torch.ones_like(p)) for p in IA3.params(model).values())
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))


def test_formula_by_hand():
    """Output scaling l ⊙ (W x + b) with l (out, 1); input scaling W (l ⊙ x) + b with l (1, in); two
    active adapters multiply."""
    torch.manual_seed(0)
    lin = nn.Linear(13, 7)
    x = torch.randn(3, 5, 13)
    W, b = lin.weight, lin.bias
    for ff, shape in ((False, (7, 1)), (True, (1, 13))):
        layer = IA3Linear(lin, is_feedforward=ff)
        layer.add("a")
        layer.add("b")
        assert layer.ia3_l["a"].shape == shape
        with torch.no_grad():
            layer.ia3_l["a"].normal_()
            layer.ia3_l["b"].normal_()
        la, lb = layer.ia3_l["a"].flatten(), layer.ia3_l["b"].flatten()
        for active, l in ((["a"], la), (["a", "b"], la * lb)):
            layer.active = active
            expected = (x * l) @ W.T + b if ff else (x @ W.T + b) * l
            torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_only_ia3_vectors_are_trainable(llama_bias_ckpt, capsys):
    model = mc.apply_ia3(mc.load_model(llama_bias_ckpt))
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    # llama: k_proj, v_proj scale their outputs (64 here: 4 kv heads of 16), down_proj its input (88)
    assert trainable == {f"model.layers.{i}.{m}.ia3_l.default": s for i in (0, 1)
                         for m, s in (("self_attn.k_proj", (64, 1)), ("self_attn.v_proj", (64, 1)),
                                      ("mlp.down_proj", (1, 88)))}
    n, total = mc.count_parameters(model)
    assert n == 2 * (64 + 64 + 88)
    assert f"IA3 'default': 6 modules (2 feedforward), trainable parameters {n:,} of {total:,}" in capsys.readouterr().out


def test_base_bit_identical_after_an_adamw_step(llama_bias_ckpt):
    model = mc.apply_ia3(mc.load_model(llama_bias_ckpt), verbose=False).train()
    changed = adamw_step_changes(model, token_ids())
    assert sorted(changed) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # every vector


def test_disable_adapters_is_exactly_the_base(llama_bias_ckpt):
    pp.disabling_gives_the_base(IA3, llama_bias_ckpt)


def test_merge_equivalence_unmerge_and_unload(llama_bias_ckpt):
    """The bias of a scaled output is scaled too (l ⊙ (W x + b)); the feedforward bias is not."""
    base_keys = set(mc.load_model(llama_bias_ckpt).state_dict())
    model = mc.apply_ia3(mc.load_model(llama_bias_ckpt), verbose=False)
    IA3.perturb(model.named_parameters())
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if ".ia3_l." not in n}
    ids = token_ids()
    with torch.no_grad():
        before = model(ids)
        mc.merge_lora(model)
        k, down = model.model.layers[0].self_attn.k_proj, model.model.layers[0].mlp.down_proj
        l_k, l_down = k.ia3_l["default"], down.ia3_l["default"]
        assert torch.equal(k.bias, w0["model.layers.0.self_attn.k_proj.bias"] * l_k.flatten())
        assert torch.equal(down.bias, w0["model.layers.0.mlp.down_proj.bias"])
        assert torch.equal(down.weight, w0["model.layers.0.mlp.down_proj.weight"] * l_down)
        torch.testing.assert_close(model(ids), before, atol=MERGE_ATOL, rtol=0)
        mc.unmerge_lora(model)
        torch.testing.assert_close(model(ids), before, atol=MERGE_ATOL, rtol=0)
    for n, p in model.named_parameters():
        if n in w0:
            torch.testing.assert_close(p, w0[n], atol=1e-6, rtol=0, msg=n)
    with torch.no_grad():
        plain = mc.merge_adapter(model)
        torch.testing.assert_close(plain(ids), before, atol=MERGE_ATOL, rtol=0)
    assert set(plain.state_dict()) == base_keys
    assert type(plain.model.layers[0].self_attn.k_proj) is nn.Linear


def test_several_named_adapters(llama_bias_ckpt):
    model = mc.load_model(llama_bias_ckpt)
    mc.apply_ia3(model, adapter_name="a", verbose=False)
    mc.apply_ia3(model, targets=["v_proj", "up_proj"], feedforward=["up_proj"], adapter_name="b", verbose=False)
    IA3.perturb(model.named_parameters())
    v = model.model.layers[0].self_attn.v_proj
    assert v.adapters == ["a", "b"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        mc.set_adapter(model, ["a", "b"])
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert len(trainable) == 2 * (3 + 2) and {n.rsplit(".", 1)[1] for n in trainable} == {"a", "b"}
        torch.testing.assert_close(v(x), v.base()(x) * (v.ia3_l["a"] * v.ia3_l["b"]).flatten(), atol=1e-6, rtol=0)
        mc.set_adapter(model, "b")
        torch.testing.assert_close(v(x), v.base()(x) * v.ia3_l["b"].flatten(), atol=1e-6, rtol=0)
        mc.delete_adapter(model, "b")
        assert v.adapters == ["a"] and v.active == []
    with pytest.raises(ValueError, match="already exists"):
        mc.apply_ia3(model, adapter_name="a")
    with pytest.raises(ValueError, match="down_proj: IA3 adapters \\['a'\\] treat it as feedforward, this one as not"):
        mc.apply_ia3(model, targets=["down_proj"], feedforward=[], adapter_name="c")


def test_merge_refuses_a_weight_tied_to_another_module(tmp_path):
    """IA3 on lm_head of a tied model (smollm): folding l into the shared matrix would rescale the input
    embeddings too, so merging refuses and leaves both untouched (PEFT would write through)."""
    path, _ = make_checkpoint(tmp_path, "smollm")
    model = mc.apply_ia3(mc.load_model(path), targets=["v_proj", "lm_head"], feedforward=["lm_head"], verbose=False)
    IA3.perturb(model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="cannot merge into lm_head: its weight is tied to another module"):
        mc.merge_lora(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing merged, v_proj included
    assert not any(m.merged for m in model.modules() if isinstance(m, IA3Linear))


@pytest.mark.parametrize("family", ["llama-bias", "mistral"])
def test_cached_generate_equals_uncached_greedy_loop(tmp_path, family):
    """The cache holds l_k ⊙ k and l_v ⊙ v (biases included), so decoding from it equals re-running the
    whole sequence at every step (mistral: with a sliding window)."""
    path, _ = make_checkpoint(tmp_path, family)
    model = mc.apply_ia3(mc.load_model(path), verbose=False).eval()
    IA3.perturb(model.named_parameters())
    seq = token_ids(2, 5, seed=6)
    cached = model.generate(seq, max_new_tokens=15)
    with torch.no_grad():
        for _ in range(15):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        with mc.disable_adapters(model):
            assert not torch.equal(model.generate(seq[:, :5], max_new_tokens=15), seq)
    assert torch.equal(cached, seq)


def test_4bit_base_equals_the_dequantized_linear():
    """On a Linear4bit base, IA3 applies the same scaling to the 4-bit layer's output or input; forward and
    the gradient of l equal IA3 on an nn.Linear holding the dequantized weight (Linear4bit's own
    tolerance, tests/test_qlora.py: it adds the bias after rounding, 1e-6). Merging refuses."""
    torch.manual_seed(0)
    q = linear4bit.Linear4bit.from_linear(nn.Linear(70, 33))
    ref = nn.Linear(70, 33)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize())
        ref.bias.copy_(q.bias)
    x = torch.randn(2, 7, 70)
    for ff in (False, True):
        a, b = IA3Linear(q, ff), IA3Linear(ref, ff)
        for m in (a, b):
            m.add("default")
            m.active = ["default"]
            IA3.perturb(m.named_parameters())
        ya, yb = a(x), b(x)
        torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-6)
        ya.square().sum().backward()
        yb.square().sum().backward()
        ga, gb = a.ia3_l["default"].grad, b.ia3_l["default"].grad
        torch.testing.assert_close(ga / gb.abs().max(), gb / gb.abs().max(), atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="the base is 4-bit and cannot take the IA3 vector"):
            a.merge("default")


def test_4bit_model_saves_the_same_keys(tmp_path):
    path, _ = make_checkpoint(tmp_path / "base", "smollm")
    model = mc.apply_ia3(mc.load_model(path, quantize="nf4"), verbose=False)
    assert isinstance(model.model.layers[0].mlp.down_proj.base_layer, linear4bit.Linear4bit)
    IA3.perturb(model.named_parameters())
    mc.save_adapter(model, tmp_path / "a")
    loaded = mc.load_adapter(mc.load_model(path, quantize="nf4"), tmp_path / "a")
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    with pytest.raises(ValueError, match="4-bit"):
        mc.merge_adapter(model)


# -- PEFT parity ------------------------------------------------------------------------------------

VARIANTS = {  # our apply_ia3 keywords -> PEFT's IA3Config keywords
    "defaults": ({}, {}),  # PEFT's per-family defaults: k (llama, mistral) or q (qwen), v, down
    "all-linear": ({"targets": "all-linear", "feedforward": ["down_proj", "o_proj"]},
                   {"target_modules": "all-linear", "feedforward_modules": ["down_proj", "o_proj"]}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", ["llama3", "smollm", "llama-bias", "qwen3", "qwen2", "mistral"])
def test_logits_and_gradients_match_peft(tmp_path, family, variant):
    """Same vectors on both: the same modules are adapted the same way (feedforward or not, same shapes),
    and logits and the gradient of every vector equal PEFT's."""
    ours_kw, peft_kw = VARIANTS[variant]
    path, hf = make_checkpoint(tmp_path / family, family)
    peft = _peft(hf, **peft_kw)
    IA3.perturb(peft.named_parameters())
    model = mc.apply_ia3(mc.load_model(path), verbose=False, **ours_kw)
    IA3.copy_peft_into(model, peft)
    assert _layers(model) == _layers(peft)
    assert len(_layers(model)) == {"defaults": 6, "all-linear": 14}[variant]
    model.train()
    peft.train()

    ids = token_ids()
    probe = torch.randn(2, 17, 131, generator=torch.Generator().manual_seed(2))
    out, ref = model(ids), peft(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    pp.adapter_matters(model, ids, out)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix(pp.PREFIX): p for n, p in peft.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    for name in ours:
        scale = theirs[name].grad.abs().max()
        torch.testing.assert_close(ours[name].grad / scale, theirs[name].grad / scale, atol=GATOL, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_two_active_adapters_and_merging_match_peft(tmp_path):
    """Two adapters active at once (their vectors multiply), on overlapping modules: logits equal PEFT's;
    merging both gives PEFT's merged weights and biases bit for bit (the same products), and unmerging
    gives PEFT's unmerged weights bit for bit (the same W / (l + 1e-8))."""
    path, hf = make_checkpoint(tmp_path / "base", "llama-bias")
    b_kw = {"target_modules": ["v_proj", "o_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    peft = _peft(hf)
    peft.add_adapter("b", IA3Config(task_type="CAUSAL_LM", **b_kw))
    peft.base_model.set_adapter(["default", "b"])
    IA3.perturb(peft.named_parameters())
    model = mc.load_model(path)
    mc.apply_ia3(model, verbose=False)
    mc.apply_ia3(model, targets=b_kw["target_modules"], feedforward=["down_proj"], adapter_name="b", verbose=False)
    mc.set_adapter(model, ["default", "b"])
    IA3.copy_peft_into(model, peft)
    peft.eval()
    ids = token_ids()
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(out, peft(input_ids=ids).logits, atol=ATOL, rtol=RTOL)

        def base_weights(m):
            return {n.removeprefix(pp.PREFIX).replace(".base_layer", ""): p.detach().clone()
                    for n, p in m.named_parameters() if ".ia3_l." not in n}

        mc.merge_lora(model)
        peft.merge_adapter()
        ours, theirs = base_weights(model), base_weights(peft)
        assert set(ours) == set(theirs)
        for n in ours:
            torch.testing.assert_close(ours[n], theirs[n], atol=0, rtol=0, msg=n)
        torch.testing.assert_close(model(ids), out, atol=MERGE_ATOL, rtol=0)
        mc.unmerge_lora(model)
        peft.unmerge_adapter()
        ours, theirs = base_weights(model), base_weights(peft)
        for n in ours:
            torch.testing.assert_close(ours[n], theirs[n], atol=0, rtol=0, msg=n)


def test_merge_adapter_matches_peft_merge_and_unload(tmp_path):
    path, hf = make_checkpoint(tmp_path / "base", "qwen2")
    peft = _peft(hf, target_modules="all-linear", feedforward_modules=["down_proj", "o_proj"])
    IA3.perturb(peft.named_parameters())
    model = mc.apply_ia3(mc.load_model(path), targets="all-linear", feedforward=["down_proj", "o_proj"], verbose=False)
    IA3.copy_peft_into(model, peft)
    merged, ref = mc.merge_adapter(model).eval(), peft.merge_and_unload().eval()
    ours, theirs = dict(merged.named_parameters()), dict(ref.named_parameters())
    assert set(ours) == set(theirs)
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], atol=0, rtol=0, msg=n)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), ref(input_ids=ids).logits, atol=ATOL, rtol=RTOL)


# -- folders ----------------------------------------------------------------------------------------

LOAD_CASES = {  # family, PEFT IA3Config keywords
    "llama3-defaults": ("llama3", {}),
    "qwen3-defaults": ("qwen3", {}),
    "smollm-list": ("smollm", {"target_modules": ["q_proj", "k_proj", "up_proj", "down_proj"],
                               "feedforward_modules": ["up_proj", "down_proj"]}),
    "llama-bias-regex": ("llama-bias", {"target_modules": r".*\.(k_proj|v_proj|gate_proj|down_proj)",
                                        "feedforward_modules": r".*\.layers\.1\..*"}),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, case):
    family, kw = LOAD_CASES[case]
    path, hf = make_checkpoint(tmp_path / "base", family)
    peft = _peft(hf, **kw)
    IA3.perturb(peft.named_parameters())
    peft.save_pretrained(tmp_path / "adapter")

    model = mc.load_adapter(mc.load_model(path), tmp_path / "adapter").eval()
    peft.eval()
    assert _layers(model) == _layers(peft)
    assert not any(p.requires_grad for p in model.parameters())
    ids = token_ids()
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(out, peft(input_ids=ids).logits, atol=ATOL, rtol=RTOL)
    pp.adapter_matters(model, ids, out)


SAVE_CASES = {  # family, apply_ia3 keywords
    "llama3-defaults": ("llama3", {}),
    "qwen3-defaults": ("qwen3", {}),
    "layers": ("llama-bias", {"layers": [1]}),
    "all-linear": ("smollm", {"targets": "all-linear", "feedforward": ["down_proj", "up_proj"]}),
    "regex": ("mistral", {"targets": r"model\.layers\.\d+\.(self_attn\.v_proj|mlp\.(up|down)_proj)",
                          "feedforward": r".*up_proj"}),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, case):
    """PeftModel.from_pretrained on a copy of the HF base reads our folder, adapts the same modules the
    same way, and gives our logits; and our folder loads back in minicustom bit for bit."""
    family, kw = SAVE_CASES[case]
    path, hf = make_checkpoint(tmp_path / "base", family)
    model = mc.apply_ia3(mc.load_model(path), verbose=False, **kw).eval()
    IA3.perturb(model.named_parameters())
    mc.save_adapter(model, tmp_path / "adapter")

    peft = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert _layers(peft) == _layers(model)
    ids = token_ids()
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(peft(input_ids=ids).logits, out, atol=ATOL, rtol=RTOL)
        assert torch.equal(mc.load_adapter(mc.load_model(path), tmp_path / "adapter")(ids), out)
    pp.adapter_matters(model, ids, out)


def test_folder_keys_and_config_are_peft_s(tmp_path):
    """The file holds exactly PEFT's keys and shapes, and adapter_config.json every field PEFT writes for IA3
    (but peft_version, which PEFT stamps itself), with the same values."""
    path, hf = make_checkpoint(tmp_path / "base", "llama3")
    peft = _peft(hf)
    peft.save_pretrained(tmp_path / "peft")
    mc.save_adapter(mc.apply_ia3(mc.load_model(path), verbose=False), tmp_path / "ours")
    ours, theirs = load_file(tmp_path / "ours/adapter_model.safetensors"), load_file(tmp_path / "peft/adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "base_model.model.model.layers.0.mlp.down_proj.ia3_l" in ours
    c_ours = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    c_theirs = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    c_theirs.pop("peft_version")
    assert set(c_ours) == set(c_theirs)
    for key in c_ours:
        same = sorted if key in ("target_modules", "feedforward_modules") else (lambda v: v)
        assert same(c_ours[key]) == same(c_theirs[key]), key


# -- errors -----------------------------------------------------------------------------------------

@pytest.fixture
def saved(llama_bias_ckpt, tmp_path):
    model = mc.apply_ia3(mc.load_model(llama_bias_ckpt), verbose=False)
    IA3.perturb(model.named_parameters())
    mc.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _edit(path, config=None, state=None):
    if config is not None:
        (path / "adapter_config.json").write_text(json.dumps(config))
    if state is not None:
        save_file(state, path / "adapter_model.safetensors")


def test_wrong_shaped_vector_in_file(llama_bias_ckpt, saved):
    _, path = saved
    state = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.ia3_l"
    state[key] = state[key].T.contiguous()  # (88, 1): an output scaling on a feedforward module
    _edit(path, state=state)
    model = mc.load_model(llama_bias_ckpt)
    with pytest.raises(mc.AdapterError, match=r"down_proj\.ia3_l: shape \(88, 1\), expected \(1, 88\) \(feedforward"):
        mc.load_adapter(model, path)
    assert IA3.untouched(model)


def test_unknown_and_missing_keys(llama_bias_ckpt, saved):
    _, path = saved
    good = load_file(path / "adapter_model.safetensors")
    cases = [  # (extra key, the message's reason)
        ("base_model.model.model.layers.0.self_attn.qkv_proj.ia3_l", "no such module"),
        ("base_model.model.model.layers.0.self_attn.o_proj.ia3_l", "not selected by target_modules"),
        ("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", "IA3's keys are"),
    ]
    for key, why in cases:
        _edit(path, state={**good, key: torch.ones(64, 1)})
        model = mc.load_model(llama_bias_ckpt)
        with pytest.raises(mc.AdapterError, match=rf"1 keys match no IA3 module of this model .*{key.replace('.', '[.]')} \({why}"):
            mc.load_adapter(model, path)
        assert IA3.untouched(model)
    missing = "base_model.model.model.layers.1.self_attn.v_proj.ia3_l"
    _edit(path, state={k: v for k, v in good.items() if k != missing})
    with pytest.raises(mc.AdapterError, match=rf"{missing.replace('.', '[.]')} is missing"):
        mc.load_adapter(mc.load_model(llama_bias_ckpt), path)


def test_feedforward_module_must_be_a_target(llama_bias_ckpt, saved):
    with pytest.raises(ValueError, match=r"feedforward modules \['down_proj'\] are not in targets \['k_proj', 'v_proj'\]"):
        mc.apply_ia3(mc.load_model(llama_bias_ckpt), targets=["k_proj", "v_proj"], feedforward=["down_proj"])
    # feedforward left to the default: down_proj only where it is targeted (PEFT would keep it and then
    # refuse to load its own folder)
    model = mc.apply_ia3(mc.load_model(llama_bias_ckpt), targets=["k_proj", "v_proj"], verbose=False)
    assert model.adapter_configs["default"].feedforward == []
    _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    _edit(path, config={**config, "target_modules": ["k_proj", "v_proj"]})
    model = mc.load_model(llama_bias_ckpt)
    with pytest.raises(mc.AdapterError, match=r"adapter_config\.json: feedforward modules \['down_proj'\] are not in targets"):
        mc.load_adapter(model, path)
    assert IA3.untouched(model)


def test_unsupported_options_and_bad_targets(llama_bias_ckpt, saved, tmp_path):
    _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    for key, value in (("fan_in_fan_out", True), ("modules_to_save", ["lm_head"]), ("exclude_modules", ["k_proj"])):
        _edit(path, config={**config, key: value})
        with pytest.raises(mc.AdapterError, match=rf"{key}={value!r} is not supported".replace("[", r"\[")):
            mc.load_adapter(mc.load_model(llama_bias_ckpt), path)
    _edit(path, config={**config, "init_ia3_weights": False})  # harmless: every vector comes from the file
    mc.load_adapter(mc.load_model(llama_bias_ckpt), path)

    with pytest.raises(ValueError, match="match no module; linear modules are named like .*down_proj"):
        mc.apply_ia3(mc.load_model(llama_bias_ckpt), targets=["qkv"])
    with pytest.raises(ValueError, match="input_layernorm is a RMSNorm; IA3 targets nn.Linear"):
        mc.apply_ia3(mc.load_model(llama_bias_ckpt), targets=["input_layernorm"], feedforward=[])
    model = mc.apply_lora(mc.load_model(llama_bias_ckpt), r=2, targets=["k_proj"], verbose=False)
    with pytest.raises(ValueError, match="k_proj already carries a LoRALinear; IA3 cannot be stacked"):
        mc.apply_ia3(model, adapter_name="ia3")
    assert mc.IA3Config(targets=("v_proj", "k_proj")).targets == ["k_proj", "v_proj"]

