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


import peft_parity as pp
import pytest
import torch
from conftest import make_checkpoint
from peft import LoHaConfig

import minicustom as mc
from minicustom.methods import get_method
from minicustom.methods.loha import FACTORS, LoHaLinear

# Every factor := N(0, 0.3²).
LOHA = pp.Method("LoHa", "loha", mc.apply_loha, LoHaConfig, LoHaLinear, (".hada_",), pp.normal(0.3))


# -- invariants and the formula --------------------------------------------------------------------

def test_identity_at_init_is_exact(ckpt):
    model = pp.exact_at_init(LOHA, ckpt)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoHaLinear) and not layer.hada_w2_b["default"].any()
    assert all(layer.adapter_state("default")[f].abs().sum() > 0 for f in FACTORS[:3])  # Kaiming, not zero


def test_formula_by_hand():
    """y = W0 x + b + Σ_active ((w1_a w1_b) ⊙ (w2_a w2_b)) (alpha / r) x; none active: the base linear."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(13, 7)
    layer = LoHaLinear(lin)
    layer.add("a", 3, 5.0 / 3)
    layer.add("b", 2, 0.5, init_weights=False)
    LOHA.perturb(layer.named_parameters())
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
    n, total = pp.trainable_shapes(model, expected)
    assert f"LoHa 'default': 4 modules, r=4, alpha=8, trainable parameters {n:,} of {total:,}" in capsys.readouterr().out


def test_base_bit_identical_after_an_adamw_step(ckpt):
    # w2_b = 0 at init: w1_a and w1_b get zero gradients at the first step (weight decay still moves them)
    pp.adamw_moves_every_trainable(mc.apply_loha(mc.load_model(ckpt), verbose=False))


def test_disable_adapters_is_exactly_the_base(ckpt):
    pp.disabling_gives_the_base(LOHA, ckpt)


def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w0(ckpt):
    pp.merge_unmerge_unload(LOHA, ckpt, pp.additive_restore_atol, targets="all-linear")


def test_on_a_4bit_base_the_adapter_runs_and_merging_is_refused():
    """On a Linear4bit base LoHa adds ΔW x to the 4-bit layer's output; merging into it refuses, unchanged."""
    pp.on_a_4bit_base(LoHaLinear, lambda layer: layer.add("a", 2, 1.0, init_weights=False), pp.adds_delta_w, "LoHa's ΔW")


def test_cached_generate_equals_uncached_greedy_loop(ckpt):
    pp.generates_as_uncached(LOHA, ckpt)


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
    _, model, peft = pp.twins(LOHA, tmp_path, family, **opts)
    pp.trains_as_peft(LOHA, model, peft)


def test_merging_matches_peft(tmp_path):
    """merge_and_unload on both sides: the same folded weights (within the parity tolerance)."""
    _, model, peft = pp.twins(LOHA, tmp_path, "qwen3")
    pp.merged_as_peft(model, peft)


# -- folders ----------------------------------------------------------------------------------------

FOLDERS = {  # family, options on both sides
    "smollm-defaults": ("smollm", dict(targets=None)),
    "qwen3-list": ("qwen3", dict(r=4, alpha=2, targets=["k_proj", "down_proj"])),
    "qwen3-regex": ("qwen3", dict(r=2, alpha=8, targets=r"model\.layers\.1\..*_proj")),
    "smollm-layer": ("smollm", dict(r=3, alpha=3, targets=["q_proj", "up_proj"], layers=[1])),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, case):
    pp.peft_folder_loads(LOHA, tmp_path, *FOLDERS[case])


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, case):
    """PeftModel.from_pretrained reads our folder, adapts the same modules and gives our logits; our folder
    loads back here bit for bit, merged or not."""
    pp.our_folder_loads(LOHA, tmp_path, *FOLDERS[case])


def test_folder_keys_and_config_are_peft_s(ckpt, tmp_path):
    """The file holds exactly PEFT's keys and shapes, and adapter_config.json every field PEFT writes for
    LOHA (but peft_version, which PEFT stamps itself), with the same values."""
    peft = LOHA.peft(make_checkpoint(tmp_path / "hf", "smollm")[1])
    ours, _ = pp.saved_as_peft_saves(mc.apply_loha(mc.load_model(ckpt), verbose=False), peft, tmp_path)
    assert {k.rsplit(".", 1)[-1] for k in ours} == set(FACTORS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.hada_w1_a" in ours


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, message", pp.not_a_linear("LoHa"))
def test_a_target_that_is_not_a_linear_is_one_line_naming_it(ckpt, targets, message):
    error = pp.attach_refused(LOHA, ckpt, dict(targets=targets), "^cannot attach LoHa: ")
    assert error.startswith(f"cannot attach LoHa: {message}") and pp.LINEARS_HERE in error


def test_the_registry_entry():
    entry = get_method("loha")
    assert entry.peft_type == "LOHA" and entry.mergeable and entry.defaults() == dict(r=8, alpha=8.0, targets=None)


@pytest.fixture
def saved(ckpt, tmp_path):
    return pp.saved_perturbed(LOHA, ckpt, tmp_path / "adapter")


def test_a_folder_that_does_not_fit_is_refused_before_anything_changes(ckpt, saved):
    config, good = pp.folder_contents(saved)
    key = "base_model.model.model.layers.1.self_attn.v_proj.hada_w2_b"
    pp.each_folder_refused(LOHA, ckpt, saved, [  # (config, tensors, message)
        (config, {**good, key: torch.ones(8, 71)}, rf"{key}: shape \(8, 71\), expected \(8, 72\)"),
        (config, {k: v for k, v in good.items() if k != key}, f"{key} is missing"),
        ({**config, "r": 4}, good, r"hada_w1_a: shape \(72, 8\), expected \(72, 4\)"),
        (config, {**good, "base_model.model.model.layers.0.mlp.up_proj.hada_w1_a": torch.ones(8, 8)},
         r"1 keys match no LoHa linear of this model .*up_proj.hada_w1_a \(not selected by target_modules\)"),
        (config, {**good, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(8, 72)},
         "LoHa's keys are base_model.model.<module>.hada_w1_a"),
        ({**config, "target_modules": ["input_layernorm"]}, good, "input_layernorm is a RMSNorm"),
        *pp.unsupported(config, good, rank_dropout=0.1, module_dropout=0.2, use_effective_conv2d=True,
                        rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 4}, exclude_modules=["v_proj"],
                        modules_to_save=["lm_head"]),
        ({**config, "r": "8"}, good, r"field 'r' must be a positive integer"),
    ])


# -- the command line -------------------------------------------------------------------------------

def test_train_generate_and_merge_from_the_command_line(setup, tmp_path, capsys):
    """`train sft --method loha --r 4` exports a PEFT LOHA folder; `generate --adapter` answers as the library
    does with it (three steps at lr 1e-2 moved w2_b off zero); `merge` writes a plain checkpoint whose logits
    equal the adapted ones within the parity tolerance (merging rounds W0 + ΔW once)."""
    config = pp.cli_train(setup, tmp_path / "run", "--method", "loha", "--r", "4", "--lr", "1e-2")
    assert (config["peft_type"], config["r"], config["target_modules"]) == ("LOHA", 4, ["q_proj", "v_proj"])
    pp.cli_generate_and_merge(setup, tmp_path / "run", tmp_path, capsys)
