"""LN tuning: invariants, the formula, PEFT parity (logits, gradients, merging, folders both ways), errors,
and the command line.

Copies are set to γ' = γ + 0.3·N(0, 1) (in name order, so two models with the same names get the same
values): with γ ~ 1 ± 0.3 (Gemma: stored around 0) every channel moves by ~30%, so the logits move by O(1)
(checked) and a copy applied in the wrong place, a missed norm or a (1 + γ') dropped shows far above round-off.

Exactness and tolerances (fp32; eps = 1.2e-7):
- Identity at init, disabled adapters, merging and unmerging: γ' starts as a bitwise copy of γ, the base
  path runs the model's own RMSNorm code on γ, and merging swaps the two parameters (no arithmetic), so
  all of these equal their reference bit for bit (zero tolerance; torch.equal).
- PEFT parity: both sides run the same norm formula on the same tensors (our RMSNorm reproduces HF's), so
  LN tuning adds no difference beyond the base models' own reduction orders: a few ulps per op through
  2-3 layers, about 1e-6 of the largest entry. Logits and every trainable gradient are compared after
  dividing by the reference's largest entry, atol 1e-5, rtol 0: ten times that bound, and still five
  orders below the adapter's own effect. Measured: logits 0.0 apart on smollm, qwen3 and gemma3;
  gradients 0.0 apart, but up to 2.0e-7 with Qwen3's per-head q_norm/k_norm adapted.
- Folders: saving and loading copy γ' bit for bit, so minicustom -> minicustom is exact and
  PEFT <-> minicustom keeps the parity tolerance.
"""

import json

import peft_parity as pp
import pytest
import torch
from conftest import make_checkpoint, token_ids
from peft import LNTuningConfig
from safetensors.torch import load_file
from test_cli_errors import fails

import minicustom as mc
from minicustom.cli import main
from minicustom.methods.ln_tuning import LNTuningNorm
from minicustom.model import RMSNorm

# Every copy γ' := γ' + 0.3·N(0, 1).
LN = pp.Method("LN tuning", "ln_tuning", mc.apply_ln_tuning, LNTuningConfig, LNTuningNorm, (".ln_tuning_layers.",),
               lambda name, p, g: p + 0.3 * torch.randn(p.shape, generator=g))


def _copies(model, adapter="default") -> dict[str, torch.Tensor]:
    """{module name: γ'} of every norm holding `adapter`, PEFT's names mapped to ours."""
    return {n.removeprefix(pp.PREFIX): m.ln_tuning_layers[adapter].weight for n, m in model.named_modules()
            if hasattr(m, "ln_tuning_layers") and adapter in m.ln_tuning_layers}


# -- invariants and the formula --------------------------------------------------------------------

@pytest.mark.parametrize("family", ["smollm", "gemma3"])
def test_identity_at_init_is_exact(tmp_path, family):
    path, _ = make_checkpoint(tmp_path, family)
    model = pp.exact_at_init(LN, path, noisy=False)
    for name, copy_ in _copies(model).items():
        assert torch.equal(copy_, model.get_submodule(name).weight) and copy_ is not model.get_submodule(name).weight


def test_formula_by_hand():
    """y = γ' ⊙ x / sqrt(mean(x²) + eps), or (1 + γ') ⊙ ... with plus_one; no adapter: γ; two active:
    refused."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 13)
    for plus_one in (False, True):
        norm = RMSNorm(13, 1e-5, plus_one)
        with torch.no_grad():
            norm.weight.normal_()
        layer = LNTuningNorm(norm)
        layer.add("a")
        layer.add("b")
        with torch.no_grad():
            layer.ln_tuning_layers["a"].weight.normal_()
        gain = layer.ln_tuning_layers["a"].weight + (1 if plus_one else 0)
        expected = gain * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        layer.active = ["a"]
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
        layer.active = []
        assert torch.equal(layer(x), norm(x))
        layer.active = ["a", "b"]
        with pytest.raises(ValueError, match=r"one adapter at a time \(as PEFT\); active: \['a', 'b'\]"):
            layer(x)


@pytest.mark.parametrize("family, norms", [("smollm", 5), ("gemma3", 13)])
def test_only_the_norm_copies_are_trainable(tmp_path, capsys, family, norms):
    """smollm (Llama): input_layernorm, post_attention_layernorm in 2 layers and the final norm; gemma3: those
    and the two feed-forward sandwich norms in 3 layers (not q_norm/k_norm)."""
    path, _ = make_checkpoint(tmp_path, family)
    model = mc.apply_ln_tuning(mc.load_model(path))
    C = model.config.hidden_size
    names = ["input_layernorm", "post_attention_layernorm"]
    names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if family == "gemma3" else []
    expected = {f"model.layers.{i}.{m}.ln_tuning_layers.default.weight": (C,)
                for i in range(model.config.num_hidden_layers) for m in names}
    expected["model.norm.ln_tuning_layers.default.weight"] = (C,)
    n, total = pp.trainable_shapes(model, expected)
    assert len(expected) == norms and n == norms * C
    assert f"LN tuning 'default': {norms} norms, trainable parameters {n:,} of {total:,}" in capsys.readouterr().out


def test_base_bit_identical_after_an_adamw_step(ckpt):
    pp.adamw_moves_every_trainable(mc.apply_ln_tuning(mc.load_model(ckpt), verbose=False))  # every copy


def test_disable_adapters_is_exactly_the_base(ckpt):
    pp.disabling_gives_the_base(LN, ckpt)


def test_merge_swaps_exactly_and_unmerge_restores_the_base(ckpt):
    """PEFT's swap: merged, the base key holds γ' and the forward is the unmerged one bit for bit; unmerged,
    γ is back (the same tensor); unloading leaves plain RMSNorms under the base keys."""
    base_keys = set(mc.load_model(ckpt).state_dict())
    model = mc.apply_ln_tuning(mc.load_model(ckpt), verbose=False)
    LN.perturb(model.named_parameters())
    gammas = {n: model.get_submodule(n).weight for n in _copies(model)}
    tuned = {n: p.detach().clone() for n, p in _copies(model).items()}
    ids = token_ids()
    with torch.no_grad():
        before = model(ids)
        mc.merge_adapters(model)
        assert all(torch.equal(model.get_submodule(n).weight, tuned[n]) for n in tuned)
        assert torch.equal(model(ids), before)
        mc.unmerge_adapters(model)
        assert all(model.get_submodule(n).weight is g for n, g in gammas.items())
        assert all(torch.equal(p, tuned[n]) for n, p in _copies(model).items())
        assert torch.equal(model(ids), before)
        plain = mc.merge_adapter(model)
        assert torch.equal(plain(ids), before)
    assert set(plain.state_dict()) == base_keys
    assert type(plain.model.layers[0].input_layernorm) is RMSNorm and not any(p.is_meta for p in plain.parameters())


def test_one_adapter_at_a_time(ckpt):
    """Several adapters: only the active one trains and applies; two active on a norm are refused in the
    forward and in merging (before anything is swapped, when both adapt the same norms); a second merge,
    deleting a merged adapter and adding one to a merged norm are refused."""
    model = mc.load_model(ckpt)
    mc.apply_ln_tuning(model, adapter_name="a", verbose=False)
    mc.apply_ln_tuning(model, targets=["norm"], adapter_name="b", verbose=False)
    mc.apply_ln_tuning(model, adapter_name="c", verbose=False)
    LN.perturb(model.named_parameters())
    final, first = model.model.norm, model.model.layers[0].input_layernorm
    assert final.adapters == ["a", "b", "c"] and first.adapters == ["a", "c"]
    mc.set_adapter(model, "b")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.norm.ln_tuning_layers.b.weight"]
    x = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(final(x), final.ln_tuning_layers["b"](x)) and first.active == []
        assert torch.equal(first(x), first.base()(x))
        mc.set_adapter(model, ["a", "c"])
        with pytest.raises(ValueError, match="LN tuning applies one adapter at a time"):
            model(token_ids())
        with pytest.raises(ValueError, match=r"merges one adapter at a time \(as PEFT\); active: \['a', 'c'\]"):
            mc.merge_adapters(model)
        assert not any(m.merged for m in model.modules() if isinstance(m, LNTuningNorm))
        with pytest.raises(ValueError, match="LN tuning merges one adapter at a time"):
            mc.merge_adapters(model, ["a"])  # PEFT would merge a; here two active are refused whatever is named
        mc.set_adapter(model, "a")
        mc.merge_adapters(model)
        with pytest.raises(ValueError, match=r"\['a'\] is merged; unmerge it before merging 'b'"):
            final.merge("b")
        with pytest.raises(ValueError, match="adapter 'a' is merged into the weights; unmerge it before deleting"):
            mc.delete_adapter(model, "a")
        with pytest.raises(ValueError, match=r"model\.norm has adapter \['a'\] merged; unmerge it before adding"):
            mc.apply_ln_tuning(model, targets=["norm"], adapter_name="d")
        mc.unmerge_adapters(model)
        mc.delete_adapter(model, "c")
        assert final.adapters == ["a", "b"] and final.active == ["a"]


@pytest.mark.parametrize("family", ["smollm", "gemma3"])
def test_cached_generate_equals_uncached_greedy_loop(tmp_path, family):
    pp.generates_as_uncached(LN, make_checkpoint(tmp_path, family)[0])


# -- PEFT parity ------------------------------------------------------------------------------------

PARITY = {  # family, targets (None: PEFT's default for the family, on both sides)
    "smollm": ("smollm", None),
    "qwen3": ("qwen3", None),
    "qwen3-qk-norms": ("qwen3", ["post_attention_layernorm", "q_norm", "k_norm", "norm"]),
    "gemma3": ("gemma3", None),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_and_gradients_match_peft(tmp_path, case):
    """Same copies on both: the same norms are adapted, and logits and the gradient of every copy equal PEFT's."""
    family, targets = PARITY[case]
    _, model, peft = pp.twins(LN, tmp_path, family, targets=targets)
    pp.trains_as_peft(LN, model, peft)


def test_merging_matches_peft(tmp_path):
    """PEFT's merge swaps too: merged and unmerged, every norm weight equals PEFT's base_layer weight and
    every copy PEFT's, bit for bit; merge_and_unload gives the same parameters."""
    _, model, peft = pp.twins(LN, tmp_path, "gemma3")

    def weights(m):
        return {n.removeprefix(pp.PREFIX).replace(".base_layer", ""): p.detach().clone() for n, p in m.named_parameters()}

    with torch.no_grad():
        for merge in (True, False):
            (mc.merge_adapters, mc.unmerge_adapters)[not merge](model)
            (peft.merge_adapter, peft.unmerge_adapter)[not merge]()
            ours, theirs = weights(model), weights(peft)
            assert set(ours) == set(theirs)
            assert all(torch.equal(ours[n], theirs[n]) for n in ours), merge
    merged, ref = pp.merged_as_peft(model, peft, exact=True)
    ids = token_ids()
    with torch.no_grad():
        pp.close(merged.eval()(ids), ref.eval()(input_ids=ids).logits, "merged logits")


# -- folders ----------------------------------------------------------------------------------------

FOLDERS = {  # family, targets on both sides
    "smollm-defaults": ("smollm", None),
    "gemma3-defaults": ("gemma3", None),
    "qwen3-list": ("qwen3", ["input_layernorm", "q_norm", "k_norm"]),
    "qwen3-regex": ("qwen3", r"model\.layers\.1\..*norm"),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, case):
    family, targets = FOLDERS[case]
    pp.peft_folder_loads(LN, tmp_path, family, dict(targets=targets))


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, case):
    """PeftModel.from_pretrained on a copy of the HF base reads our folder, adapts the same norms and gives
    our logits; our folder loads back in minicustom bit for bit, and a merged adapter saves γ', not γ."""
    family, targets = FOLDERS[case]
    pp.our_folder_loads(LN, tmp_path, family, dict(targets=targets))
    assert load_file(tmp_path / "merged/adapter_model.safetensors").keys() == load_file(
        tmp_path / "adapter/adapter_model.safetensors").keys()


def test_folder_keys_and_config_are_peft_s(ckpt, tmp_path):
    """The file holds exactly PEFT's keys and shapes, and adapter_config.json every field PEFT writes for
    LN_TUNING (but peft_version, which PEFT stamps itself), with the same values."""
    peft = LN.peft(make_checkpoint(tmp_path / "hf", "smollm")[1])
    ours, _ = pp.saved_as_peft_saves(mc.apply_ln_tuning(mc.load_model(ckpt), verbose=False), peft, tmp_path)
    assert "base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight" in ours


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, message", [
    (["q_proj"], "model.layers.0.self_attn.q_proj (Linear) is not a norm (LN tuning adapts RMSNorm modules) "
                 "(and 1 more)"),
    (["input_layernorm", "mlp"], "model.layers.0.mlp (MLP) is not a norm"),
    (["input_layernorm", "nope"], "target 'nope' matches no module"),
    (r".*\.layers\.0\..*", "model.layers.0.self_attn (Attention) is not a norm"),
])
def test_a_target_that_is_not_a_norm_is_one_line_naming_it(ckpt, targets, message):
    error = pp.attach_refused(LN, ckpt, dict(targets=targets), "^cannot attach LN tuning: ")
    assert error.startswith(f"cannot attach LN tuning: {message}")
    assert error.endswith("norms here are named input_layernorm, norm, post_attention_layernorm")


@pytest.fixture
def saved(ckpt, tmp_path):
    return pp.saved_perturbed(LN, ckpt, tmp_path / "adapter")


def test_a_folder_that_does_not_fit_is_refused_before_anything_changes(ckpt, saved):
    config, good = pp.folder_contents(saved)
    key = "base_model.model.model.layers.1.input_layernorm.ln_tuning_layers.weight"
    pp.each_folder_refused(LN, ckpt, saved, [  # (config, tensors, message)
        (config, {**good, key: torch.ones(71)}, rf"{key}: shape \(71,\), expected \(72,\)"),
        (config, {k: v for k, v in good.items() if k != key}, f"{key} is missing"),
        (config, {**good, "base_model.model.model.layers.0.self_attn.q_norm.ln_tuning_layers.weight": torch.ones(8)},
         r"1 keys match no LN tuning norm of this model .*q_norm.ln_tuning_layers.weight \(no such module\)"),
        (config, {**good, "base_model.model.model.layers.0.input_layernorm.ia3_l": torch.ones(72)},
         "LN tuning's keys are base_model.model.<module>.ln_tuning_layers.weight"),
        ({**config, "target_modules": ["q_proj"]}, good, r"q_proj \(Linear\) is not a norm"),
        *pp.unsupported(config, good, exclude_modules=["norm"], modules_to_save=["lm_head"]),
    ])


# -- the command line -------------------------------------------------------------------------------

def test_train_generate_and_merge_from_the_command_line(setup, tmp_path, capsys):
    """`train sft --method ln_tuning` exports a PEFT folder; `generate --adapter` answers as the library does
    with it (three steps at lr 1e-2 moved the copies off γ); `merge` writes a plain checkpoint with the same
    logits."""
    config = pp.cli_train(setup, tmp_path / "run", "--method", "ln_tuning", "--lr", "1e-2")
    assert config["peft_type"] == "LN_TUNING"
    pp.cli_generate_and_merge(setup, tmp_path / "run", tmp_path, capsys, exact=True)


def test_targets_on_the_command_line_are_norms(setup, tmp_path, capsys):
    """`--targets` names norms for LN tuning: one trains only that norm's copies; a linear is refused in one
    line that lists the norms, and nothing is written."""
    root, path = setup
    out = tmp_path / "run"
    argv = ["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--max-length", "128",
            "--batch-size", "2", "--max-steps", "1", "--exact-match", "0", "--method", "ln_tuning"]
    main([*argv, "--out", str(out), "--targets", "input_layernorm"])
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["input_layernorm"]
    assert {k.split(".")[-3] for k in load_file(out / "adapter_model.safetensors")} == {"input_layernorm"}
    err = fails([*argv, "--out", tmp_path / "bad", "--targets", "q_proj"], capsys)
    assert "--targets q_proj: no layer ln_tuning adapts of the model is named q_proj (its layers: " in err
    assert "input_layernorm" in err and "q_proj," not in err and not (tmp_path / "bad").exists()
