"""LoHa: invariants, the formula, PEFT parity (logits, gradients, merging, folders both ways) and errors.

Factors are set to N(0, 0.3²) (in name order, so two models with the same names get the same values): with
r = 8, an entry of w1_a w1_b is ~0.3²·√8 ≈ 0.25 and of ΔW ~0.065, against tiny-model weights of ~0.02, so
the logits move by O(1) (checked), and a factor swapped, transposed or scaled wrongly shows far above
round-off.

Exactness and tolerances (fp32, eps = 1.2e-7):
- Identity at init and disabled adapters: w2_b = 0 makes ΔW = 0 and ΔW x = 0 exactly, and y + 0 = y; with no
  active adapter the forward is the base linear alone. Zero tolerance (torch.equal).
- PEFT parity: both sides compute W0 x + b + x ΔWᵀ with ΔW = ((w1_a w1_b) ⊙ (w2_a w2_b))·s on the same
  tensors; only the summation order of the matmuls and PEFT's hand-written backward (HadaWeight) against
  autograd differ: a few ulps per op, compounded over 2-3 layers, about 1e-6 of the largest entry. Logits and
  every trainable gradient are compared after dividing by the reference's largest entry, atol 1e-5, rtol 0:
  ten times that bound, five orders below the adapter's own effect. Measured: logits and gradients 0.0 apart
  on all four parity cases (smollm, qwen3, qwen3 all-linear, smollm MLP).
- Merging: W0 + ΔW rounds once per entry (≤ ulp(|W0| + |ΔW|)/2 ≈ 6e-8 relative), then the forward runs one
  matmul of (W0 + ΔW) instead of two; the logits move by the same few ulps per op through the layers, so the
  parity tolerance (1e-5 of the largest logit) holds. Measured: 6.5e-7 to 2.0e-6 of the largest logit. Unmerging subtracts the same ΔW: each entry of W0 comes
  back within one rounding of |W0| + |ΔW|, so atol = 2·eps·max(|W0| + |ΔW|), rtol 0.
- Folders: saving and loading copy the factors bit for bit, so minicustom -> minicustom is exact and
  PEFT <-> minicustom keeps the parity tolerance.
"""

import json

import pytest
import torch
from conftest import (
    adamw_step_changes,
    close_to_largest,
    disabled_is_the_base,
    greedy_uncached,
    make_checkpoint,
    matches_peft,
    token_ids,
)
from peft import LoHaConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import minicustom as mc
from minicustom.cli import main
from minicustom.methods import apply_method, get_method
from minicustom.methods.loha import FACTORS, LoHaLinear
from minicustom.prompting import default_stop_ids

TOL = 1e-5  # logits and gradients against PEFT, divided by the reference's largest entry
PREFIX = "base_model.model."
EPS = torch.finfo(torch.float32).eps

_ids = token_ids


@torch.no_grad()
def _perturb(named_params, seed=0):
    """Every factor := N(0, 0.3²), in name order (PEFT's names without PREFIX equal ours)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted((n.removeprefix(PREFIX), p) for n, p in named_params):
        if ".hada_" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _factors(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if ".hada_" in n}


def _assert_close(out, ref, what=""):
    close_to_largest(out, ref, TOL, what)


def _assert_adapter_matters(model, ids, out):
    with torch.no_grad(), mc.disable_adapters(model):
        assert (out - model(ids)).abs().max() > 0.1


def _peft(hf, **kw):
    return get_peft_model(hf, LoHaConfig(task_type="CAUSAL_LM", **kw))


def _untouched(model):
    return not any(isinstance(m, LoHaLinear) for m in model.modules()) and not getattr(model, "adapter_configs", {})


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "base", "smollm")[0]


# -- invariants and the formula --------------------------------------------------------------------

def test_identity_at_init_is_exact(ckpt):
    base = mc.load_model(ckpt)
    model = mc.apply_loha(mc.load_model(ckpt), verbose=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoHaLinear) and not layer.hada_w2_b["default"].any()
    assert all(layer.adapter_state("default")[f].abs().sum() > 0 for f in FACTORS[:3])  # Kaiming, not zero
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))
    noisy = mc.apply_loha(mc.load_model(ckpt), init_weights=False, verbose=False)
    with torch.no_grad():
        assert not torch.equal(noisy(ids), base(ids))


def test_formula_by_hand():
    """y = W0 x + b + Σ_active ((w1_a w1_b) ⊙ (w2_a w2_b)) (alpha / r) x; none active: the base linear."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(13, 7)
    layer = LoHaLinear(lin)
    layer.add("a", 3, 5.0 / 3)
    layer.add("b", 2, 0.5, init_weights=False)
    _perturb(layer.named_parameters())
    x = torch.randn(4, 5, 13)

    def dw(n):
        p = layer.adapter_state(n)
        return (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * layer.scaling[n]

    layer.active = ["a", "b"]
    expected = x @ (lin.weight + dw("a") + dw("b")).T + lin.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.active = []
    assert torch.equal(layer(x), lin(x))


@pytest.mark.parametrize("family", ["smollm", "qwen3"])
def test_only_the_factors_are_trainable(tmp_path, capsys, family):
    """PEFT's default targets for both families: q_proj and v_proj in each of the 2 layers, four factors each."""
    path, _ = make_checkpoint(tmp_path, family)
    model = mc.apply_loha(mc.load_model(path), r=4)
    expected = {}
    for i in range(model.config.num_hidden_layers):
        for m in ("q_proj", "v_proj"):
            lin = model.model.layers[i].self_attn.get_submodule(m)
            o, n = lin.out_features, lin.in_features
            for f, shape in zip(FACTORS, [(o, 4), (4, n), (o, 4), (4, n)]):
                expected[f"model.layers.{i}.self_attn.{m}.{f}.default"] = shape
    assert {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad} == expected
    n, total = mc.count_parameters(model)
    assert n == sum(a * b for a, b in expected.values())
    assert f"LoHa 'default': 4 modules, r=4, alpha=8, trainable parameters {n:,} of {total:,}" in capsys.readouterr().out


def test_base_bit_identical_after_an_adamw_step(ckpt):
    model = mc.apply_loha(mc.load_model(ckpt), verbose=False).train()
    changed = adamw_step_changes(model, _ids())
    # w2_b = 0 at init: w1_a and w1_b get zero gradients at the first step (weight decay still moves them)
    assert sorted(changed) == sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_disable_adapters_is_exactly_the_base(ckpt):
    base = mc.load_model(ckpt)
    model = apply_method(mc.load_model(ckpt), "loha")
    _perturb(model.named_parameters())
    ids = _ids()
    adapted = disabled_is_the_base(model, base, ids)
    with torch.no_grad():
        _assert_adapter_matters(model, ids, adapted)
        mc.merge_adapters(model)
        with pytest.raises(ValueError, match="merged into the base weights"), mc.disable_adapters(model):
            pass


def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w0(ckpt):
    base_keys = set(mc.load_model(ckpt).state_dict())
    model = mc.apply_loha(mc.load_model(ckpt), targets="all-linear", verbose=False)
    _perturb(model.named_parameters())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoHaLinear)}
    w0 = {n: m.weight.detach().clone() for n, m in layers.items()}
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
        _assert_adapter_matters(model, ids, before)
        dws = {n: m.delta_weight("default") for n, m in layers.items()}
        mc.merge_adapters(model)
        _assert_close(model(ids), before, "merged")
        mc.unmerge_adapters(model)
        for n, m in layers.items():
            atol = 2 * EPS * (w0[n].abs() + dws[n].abs()).max().item()
            torch.testing.assert_close(m.weight, w0[n], atol=atol, rtol=0)
        plain = mc.merge_adapter(model)
        _assert_close(plain(ids), before, "unloaded")
    assert set(plain.state_dict()) == base_keys and not any(isinstance(m, LoHaLinear) for m in plain.modules())


def test_on_a_4bit_base_the_adapter_runs_and_merging_is_refused():
    """On a Linear4bit base LoHa adds ΔW x to the 4-bit layer's output; merging into it refuses, unchanged."""
    torch.manual_seed(0)
    q = mc.Linear4bit.from_linear(torch.nn.Linear(70, 33))
    layer = LoHaLinear(q)
    layer.add("a", 2, 1.0, init_weights=False)
    layer.active = ["a"]
    x = torch.randn(3, 70)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), q(x) + x @ layer.delta_weight("a").T, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="the base is 4-bit and cannot take LoHa's ΔW in place"):
            layer.merge("a")
    assert not layer.merged


def test_cached_generate_equals_uncached_greedy_loop(ckpt):
    model = mc.apply_loha(mc.load_model(ckpt), verbose=False).eval()
    _perturb(model.named_parameters())
    seq = _ids(2, 5, seed=6)
    cached = model.generate(seq, max_new_tokens=15)
    assert torch.equal(cached, greedy_uncached(model, seq, 15))
    with torch.no_grad(), mc.disable_adapters(model):
        assert not torch.equal(model.generate(seq, max_new_tokens=15), cached)


# -- PEFT parity ------------------------------------------------------------------------------------

PARITY = {  # family, options on both sides (None targets: PEFT's default for the family)
    "smollm": ("smollm", dict(r=8, alpha=8, targets=None)),
    "qwen3": ("qwen3", dict(r=8, alpha=8, targets=None)),
    "qwen3-all-linear": ("qwen3", dict(r=3, alpha=5, targets="all-linear")),
    "smollm-mlp": ("smollm", dict(r=4, alpha=16, targets=["gate_proj", "down_proj"])),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_and_gradients_match_peft(tmp_path, case):
    family, opts = PARITY[case]
    path, hf = make_checkpoint(tmp_path / family, family)
    peft = _peft(hf, r=opts["r"], alpha=opts["alpha"], target_modules=opts["targets"])
    _perturb(peft.named_parameters())
    model = mc.apply_loha(mc.load_model(path), **opts, verbose=False)
    ours, theirs = _factors(model), _factors(peft)
    assert set(ours) == set(theirs)
    with torch.no_grad():
        for n, p in ours.items():
            p.copy_(theirs[n])
    model.train()
    peft.train()

    ids = _ids()
    out = matches_peft(model, peft, ids, TOL)
    _assert_adapter_matters(model, ids, out)
    assert sum(p.requires_grad for p in model.parameters()) == len(_factors(peft))


def test_merging_matches_peft(tmp_path):
    """merge_and_unload on both sides: the same folded weights (within the parity tolerance)."""
    path, hf = make_checkpoint(tmp_path / "base", "qwen3")
    peft = _peft(hf)
    _perturb(peft.named_parameters())
    model = mc.apply_loha(mc.load_model(path), verbose=False)
    with torch.no_grad():
        for n, p in _factors(model).items():
            p.copy_(_factors(peft)[n])
    merged, ref = mc.merge_adapter(model), peft.merge_and_unload()
    ours, theirs = dict(merged.named_parameters()), dict(ref.named_parameters())
    assert set(ours) == set(theirs)
    for n in ours:
        _assert_close(ours[n], theirs[n], n)


# -- folders ----------------------------------------------------------------------------------------

FOLDERS = {  # family, options on both sides
    "smollm-defaults": ("smollm", dict(targets=None)),
    "qwen3-list": ("qwen3", dict(r=4, alpha=2, targets=["k_proj", "down_proj"])),
    "qwen3-regex": ("qwen3", dict(r=2, alpha=8, targets=r"model\.layers\.1\..*_proj")),
    "smollm-layer": ("smollm", dict(r=3, alpha=3, targets=["q_proj", "up_proj"], layers=[1])),
}


def _peft_opts(opts):
    peft = dict(target_modules=opts["targets"], r=opts.get("r", 8), alpha=opts.get("alpha", 8))
    return {**peft, "layers_to_transform": opts["layers"]} if "layers" in opts else peft


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, case):
    family, opts = FOLDERS[case]
    path, hf = make_checkpoint(tmp_path / "base", family)
    peft = _peft(hf, **_peft_opts(opts))
    _perturb(peft.named_parameters())
    peft.save_pretrained(tmp_path / "adapter")

    model = mc.load_adapter(mc.load_model(path), tmp_path / "adapter").eval()
    peft.eval()
    assert set(_factors(model)) == set(_factors(peft))
    assert not any(p.requires_grad for p in model.parameters())
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        _assert_close(out, peft(input_ids=ids).logits, "logits")
    _assert_adapter_matters(model, ids, out)


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, case):
    """PeftModel.from_pretrained reads our folder, adapts the same modules and gives our logits; our folder
    loads back here bit for bit, merged or not."""
    family, opts = FOLDERS[case]
    path, hf = make_checkpoint(tmp_path / "base", family)
    model = mc.apply_loha(mc.load_model(path), **opts, verbose=False).eval()
    _perturb(model.named_parameters())
    mc.save_adapter(model, tmp_path / "adapter")

    peft = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert set(_factors(peft)) == set(_factors(model))
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        _assert_close(peft(input_ids=ids).logits, out, "logits")
        assert torch.equal(mc.load_adapter(mc.load_model(path), tmp_path / "adapter")(ids), out)
        mc.merge_adapters(model)
        mc.save_adapter(model, tmp_path / "merged")
        assert torch.equal(mc.load_adapter(mc.load_model(path), tmp_path / "merged")(ids), out)


def test_folder_keys_and_config_are_peft_s(ckpt, tmp_path):
    """The file holds exactly PEFT's keys and shapes, and adapter_config.json every field PEFT writes for
    LOHA (but peft_version, which PEFT stamps itself), with the same values."""
    hf = make_checkpoint(tmp_path / "hf", "smollm")[1]
    _peft(hf).save_pretrained(tmp_path / "peft")
    mc.save_adapter(mc.apply_loha(mc.load_model(ckpt), verbose=False), tmp_path / "ours")
    ours = load_file(tmp_path / "ours/adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert {k.rsplit(".", 1)[-1] for k in ours} == set(FACTORS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.hada_w1_a" in ours
    c_ours = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    c_theirs = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    c_theirs.pop("peft_version")
    assert set(c_ours) == set(c_theirs)
    for key in c_ours:
        same = sorted if key == "target_modules" else (lambda v: v)
        assert same(c_ours[key]) == same(c_theirs[key]), key


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, message", [
    (["q_proj", "nope"], "target 'nope' matches no module"),
    (["input_layernorm"], "model.layers.0.input_layernorm is a RMSNorm; LoHa targets nn.Linear"),
    (r".*\.layers\.0\.self_attn", "model.layers.0.self_attn is a Attention; LoHa targets nn.Linear"),
])
def test_a_target_that_is_not_a_linear_is_one_line_naming_it(ckpt, targets, message):
    model = mc.load_model(ckpt)
    with pytest.raises(ValueError) as e:
        mc.apply_loha(model, targets=targets)
    assert str(e.value).startswith(f"cannot attach LoHa: {message}") and "\n" not in str(e.value)
    assert "linear modules here are named down_proj, gate_proj, k_proj, lm_head, o_proj" in str(e.value)
    assert _untouched(model)


def test_the_registry_entry():
    entry = get_method("loha")
    assert entry.peft_type == "LOHA" and entry.mergeable and entry.defaults() == dict(r=8, alpha=8.0, targets=None)


@pytest.fixture
def saved(ckpt, tmp_path):
    model = mc.apply_loha(mc.load_model(ckpt), verbose=False)
    _perturb(model.named_parameters())
    mc.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_a_folder_that_does_not_fit_is_refused_before_anything_changes(ckpt, saved):
    good = load_file(saved / "adapter_model.safetensors")
    config = json.loads((saved / "adapter_config.json").read_text())
    key = "base_model.model.model.layers.1.self_attn.v_proj.hada_w2_b"
    cases = [  # (config, tensors, message)
        (config, {**good, key: torch.ones(8, 71)}, rf"{key}: shape \(8, 71\), expected \(8, 72\)"),
        (config, {k: v for k, v in good.items() if k != key}, f"{key} is missing"),
        ({**config, "r": 4}, good, r"hada_w1_a: shape \(72, 8\), expected \(72, 4\)"),
        (config, {**good, "base_model.model.model.layers.0.mlp.up_proj.hada_w1_a": torch.ones(8, 8)},
         r"1 keys match no LoHa linear of this model .*up_proj.hada_w1_a \(not selected by target_modules\)"),
        (config, {**good, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(8, 72)},
         "LoHa's keys are base_model.model.<module>.hada_w1_a"),
        ({**config, "target_modules": ["input_layernorm"]}, good, "input_layernorm is a RMSNorm"),
        ({**config, "rank_dropout": 0.1}, good, r"rank_dropout=0.1 is not supported"),
        ({**config, "module_dropout": 0.2}, good, r"module_dropout=0.2 is not supported"),
        ({**config, "use_effective_conv2d": True}, good, r"use_effective_conv2d=True is not supported"),
        ({**config, "rank_pattern": {"q_proj": 4}}, good, r"rank_pattern=\{'q_proj': 4\} is not supported"),
        ({**config, "alpha_pattern": {"q_proj": 4}}, good, r"alpha_pattern=\{'q_proj': 4\} is not supported"),
        ({**config, "exclude_modules": ["v_proj"]}, good, r"exclude_modules=\['v_proj'\] is not supported"),
        ({**config, "modules_to_save": ["lm_head"]}, good, r"modules_to_save=\['lm_head'\] is not supported"),
        ({**config, "r": "8"}, good, r"field 'r' must be a positive integer"),
    ]
    for cfg, state, message in cases:
        (saved / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(state, saved / "adapter_model.safetensors")
        model = mc.load_model(ckpt)
        with pytest.raises(mc.AdapterError, match=message):
            mc.load_adapter(model, saved)
        assert _untouched(model), message


# -- the command line -------------------------------------------------------------------------------

def test_train_generate_and_merge_from_the_command_line(setup, tmp_path, capsys):
    """`train sft --method loha --r 4` exports a PEFT LOHA folder; `generate --adapter` answers as the library
    does with it; `merge` writes a plain checkpoint whose logits equal the adapted ones within the parity
    tolerance (merging rounds W0 + ΔW once)."""
    root, path = setup
    out = tmp_path / "run"
    main(["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--out", str(out),
          "--method", "loha", "--r", "4", "--max-length", "128", "--batch-size", "2", "--max-steps", "3",
          "--lr", "1e-2", "--exact-match", "0", "--seed", "1"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["target_modules"]) == ("LOHA", 4, ["q_proj", "v_proj"])
    capsys.readouterr()
    main(["generate", "--model", str(path), "--adapter", str(out), "--prompt", "Where is Paris?",
          "--max-new-tokens", "6"])
    cli_answer = capsys.readouterr().out

    model, tok = mc.load_model(path), mc.load_tokenizer(path)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Where is Paris?"}],
                                                add_generation_prompt=True)])
    with torch.no_grad():
        base = model(ids)
    mc.load_adapter(model, out)
    with torch.no_grad():
        adapted = model(ids)
    assert not torch.equal(adapted, base)  # three steps at lr 1e-2 moved w2_b off zero
    new = model.generate(ids, max_new_tokens=6, stop=default_stop_ids(model, tok))[0, ids.shape[1]:]
    assert tok.decode(new.tolist(), skip_special_tokens=True).strip() in cli_answer

    main(["merge", "--model", str(path), "--adapter", str(out), "--out", str(tmp_path / "merged")])
    with torch.no_grad():
        _assert_close(mc.load_model(tmp_path / "merged")(ids), adapted, "merged checkpoint")
