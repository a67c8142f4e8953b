"""LoKr: invariants, the factorization and the formula, PEFT parity (draws, logits, gradients, merging, folders
both ways) and errors.

Factors are set to N(0, 0.3²) (in name order, so two models with the same names get the same values): an
entry of a full w1 or w2 is ~0.3, of a product w*_a w*_b ~0.3²·√r, so an entry of ΔW = (w1 ⊗ w2)·s (one
product of two entries, no sum) is ~0.09·s to ~0.1·s, against tiny-model weights of ~0.2: the logits move by
O(1) (checked), and a factor swapped, transposed, split the wrong way or scaled wrongly shows far above
round-off.

Exactness and tolerances (fp32, eps = 1.2e-7):
- Identity at init and disabled adapters: init_weights True makes w1 (or w1_a) zero and "lycoris" w2 (or
  w2_b): ΔW = 0 ⊗ w2 or w1 ⊗ 0 = 0 and ΔW x = 0 exactly, and y + 0 = y; with no active adapter the forward is
  the base linear alone. Zero tolerance (torch.equal).
- Draws: the same seed gives PEFT's factors bit for bit (the same shapes, Kaiming draws in the same order),
  so those are compared with torch.equal.
- PEFT parity: both sides compute W0 x + b + x ΔWᵀ with ΔW = kron(w1, w2)·s on the same tensors, by the same
  operations (a kron is one rounded product per entry, no sum); only matmul summation orders could differ,
  a few ulps per op, compounded over 2 layers, about 1e-6 of the largest entry. Logits and every trainable
  gradient are compared after dividing by the reference's largest entry, atol 1e-5, rtol 0: ten times that
  bound, five orders below the adapter's own effect. Measured: logits and gradients 0.0 apart on all five
  parity cases (full and low-rank factors, decompose_both, decompose_factor, lycoris init).
- Merging: W0 + ΔW rounds once per entry (≤ ulp(|W0| + |ΔW|)/2 ≈ 6e-8 relative), then the forward runs one
  matmul of (W0 + ΔW) instead of two; the logits move by the same few ulps per op through the layers, so the
  parity tolerance (1e-5 of the largest logit) holds. Measured: 1.6e-6 (r = 8, full factors) and 1.9e-6
  (r = 2, decompose_both, decompose_factor 4) of the largest logit, all-linear on smollm. Unmerging subtracts
  the same ΔW: each entry of W0 comes back within one rounding of |W0| + |ΔW|, so atol = 2·eps·max(|W0| + |ΔW|),
  rtol 0.
- Folders: saving and loading copy the factors bit for bit, so minicustom -> minicustom is exact and
  PEFT <-> minicustom keeps the parity tolerance.
"""


import peft_parity as pp
import pytest
import torch
from conftest import make_checkpoint
from peft import LoKrConfig
from peft.tuners.lokr.layer import factorization as peft_factorization
from safetensors.torch import load_file

import minicustom as mc
from minicustom.methods import get_method
from minicustom.methods.lokr import FACTORS, LoKrLinear, factor_shapes, factorization

# Every factor := N(0, 0.3²).
LOKR = pp.Method("LoKr", "lokr", mc.apply_lokr, LoKrConfig, LoKrLinear, (".lokr_",), pp.normal(0.3))


# -- the factorization and the formula -------------------------------------------------------------

def test_factorization_is_peft_s():
    """PEFT's docstring examples by hand, then every dimension to 300 with every kind of factor against
    PEFT's own function (a divisor, a non-divisor bounding m, one past the dimension, -1)."""
    assert [factorization(256), factorization(128), factorization(127), factorization(128, 4)] == [
        (16, 16), (8, 16), (1, 127), (4, 32)]
    assert factorization(72) == (8, 9) and factorization(72, 5) == (4, 18) and factorization(64, 16) == (16, 4)
    for dim in range(1, 300):
        for f in (-1, 1, 2, 3, 4, 5, 7, 8, 16, 33, 500):
            assert factorization(dim, f) == peft_factorization(dim, f), (dim, f)


@pytest.mark.parametrize("r, both, factor, expected", [
    # 72 = 8·9 both ways: w1 (8, 8), w2 (9, 9); w2 is a product when r < 9/2, w1 (with decompose_both) when r < 8/2
    (8, False, -1, dict(lokr_w1=(8, 8), lokr_w2=(9, 9))),
    (5, True, -1, dict(lokr_w1=(8, 8), lokr_w2=(9, 9))),
    (4, False, -1, dict(lokr_w1=(8, 8), lokr_w2_a=(9, 4), lokr_w2_b=(4, 9))),
    (4, True, -1, dict(lokr_w1=(8, 8), lokr_w2_a=(9, 4), lokr_w2_b=(4, 9))),  # 4 < 8/2 is false
    (3, True, -1, dict(lokr_w1_a=(8, 3), lokr_w1_b=(3, 8), lokr_w2_a=(9, 3), lokr_w2_b=(3, 9))),
    # decompose_factor 4 divides 72: (4, 18); w2 (18, 18) is a product for r < 9
    (8, True, 4, dict(lokr_w1=(4, 4), lokr_w2_a=(18, 8), lokr_w2_b=(8, 18))),
    (9, False, 4, dict(lokr_w1=(4, 4), lokr_w2=(18, 18))),
])
def test_factor_shapes_follow_peft_s_rule_by_hand(r, both, factor, expected):
    shapes = factor_shapes(72, 72, r, both, factor)
    assert shapes == expected and list(shapes) == [f for f in FACTORS if f in expected]  # PEFT's order


def test_formula_by_hand():
    """y = W0 x + b + Σ_active (w1 ⊗ w2)(alpha / r) x, the Kronecker product written out entry by entry:
    ΔW[i·out_k + p, j·in_n + q] = w1[i, j] w2[p, q]; none active: the base linear."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 10)  # out 10 = 2·5, in 12 = 3·4: w1 (2, 3), w2 (5, 4)
    layer = LoKrLinear(lin)
    layer.add("a", factor_shapes(10, 12, 1), 5.0)  # w1 full; w2 = w2_a (5, 1) @ w2_b (1, 4) as 1 < 5/2
    layer.add("b", factor_shapes(10, 12, 3), 0.5, init_weights=False)  # both full: 3 < 5/2 fails
    layer.add("c", factor_shapes(10, 12, 1, True), 2.0, init_weights="lycoris")  # both products: 1 < 3/2
    assert set(layer.adapter_state("a")) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    assert set(layer.adapter_state("b")) == {"lokr_w1", "lokr_w2"}
    assert set(layer.adapter_state("c")) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    LOKR.perturb(layer.named_parameters())
    x = torch.randn(4, 5, 12)

    def dw(n):
        p = layer.adapter_state(n)
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        return (w1[:, None, :, None] * w2[None, :, None, :]).reshape(10, 12) * layer.scaling[n]  # (2, 5, 3, 4)

    layer.active = ["a", "b", "c"]
    expected = x @ (lin.weight + dw("a") + dw("b") + dw("c")).T + lin.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.active = []
    assert torch.equal(layer(x), lin(x))


# -- invariants ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("init, zero", [(True, {"lokr_w1", "lokr_w1_a"}), ("lycoris", {"lokr_w2", "lokr_w2_b"})])
@pytest.mark.parametrize("r, both", [(8, False), (2, True)])
def test_identity_at_init_is_exact(ckpt, init, zero, r, both):
    model = pp.exact_at_init(LOKR, ckpt, r=r, decompose_both=both, init_weights=init)
    state = model.model.layers[0].self_attn.q_proj.adapter_state("default")
    assert any(f in zero for f in state)
    for f, t in state.items():  # the zero factor is zero; every other one Kaiming, not zero
        assert (not t.any()) if f in zero else t.abs().sum() > 0, f


@pytest.mark.parametrize("init", [True, False, "lycoris"])
@pytest.mark.parametrize("opts", [dict(r=8), dict(r=2, decompose_both=True, targets="all-linear"),
                                  dict(r=1, decompose_factor=4, targets=["k_proj", "down_proj"])])
def test_the_same_seed_draws_peft_s_factors(tmp_path, init, opts):
    path, hf = make_checkpoint(tmp_path, "qwen3")
    torch.manual_seed(3)
    peft = LOKR.peft(hf, init_weights=init, **LOKR.to_peft(opts))
    torch.manual_seed(3)
    model = mc.apply_lokr(mc.load_model(path), init_weights=init, verbose=False, **opts)
    ours, theirs = LOKR.params(model), LOKR.params(peft)
    assert set(ours) == set(theirs)
    for n in ours:
        assert torch.equal(ours[n], theirs[n]), n


@pytest.mark.parametrize("family", ["smollm", "qwen3"])
def test_only_the_factors_are_trainable(tmp_path, capsys, family):
    """PEFT's default targets, q_proj and v_proj in each of the 2 layers, at r = 4. smollm: q_proj (72, 72)
    splits 72 = 8·9 both ways, w1 (8, 8) and w2 (9, 9), a product as 4 < 9/2; v_proj (24, 72) splits 24 = 4·6,
    w1 (4, 8) and w2 (6, 9), a product as 4 < 9/2. qwen3: q_proj (96, 64), 96 = 8·12 and 64 = 8·8, w1 (8, 8),
    w2 (12, 8) a product as 4 < 12/2; v_proj (48, 64), 48 = 6·8, w1 (6, 8) and w2 (8, 8) full as 4 < 8/2 fails."""
    path, _ = make_checkpoint(tmp_path, family)
    model = mc.apply_lokr(mc.load_model(path), r=4)
    shapes = {
        "smollm": {"q_proj": dict(lokr_w1=(8, 8), lokr_w2_a=(9, 4), lokr_w2_b=(4, 9)),
                   "v_proj": dict(lokr_w1=(4, 8), lokr_w2_a=(6, 4), lokr_w2_b=(4, 9))},
        "qwen3": {"q_proj": dict(lokr_w1=(8, 8), lokr_w2_a=(12, 4), lokr_w2_b=(4, 8)),
                  "v_proj": dict(lokr_w1=(6, 8), lokr_w2=(8, 8))},
    }[family]
    n, total = pp.trainable_shapes(model, {f"model.layers.{i}.self_attn.{m}.{f}.default": shape
                                        for i in range(2) for m, factors in shapes.items()
                                        for f, shape in factors.items()})
    printed = capsys.readouterr().out
    assert f"LoKr 'default': 4 modules, r=4, alpha=8, trainable parameters {n:,} of {total:,}" in printed


def test_base_bit_identical_after_an_adamw_step(ckpt):
    # w1_a = 0 at init: w1_b and w2's factors get zero gradients at the first step (weight decay moves them)
    pp.adamw_moves_every_trainable(mc.apply_lokr(mc.load_model(ckpt), r=2, decompose_both=True, verbose=False))


def test_disable_adapters_is_exactly_the_base(ckpt):
    pp.disabling_gives_the_base(LOKR, ckpt)


@pytest.mark.parametrize("opts", [dict(r=8), dict(r=2, decompose_both=True, decompose_factor=4)])
def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w0(ckpt, opts):
    pp.merge_unmerge_unload(LOKR, ckpt, pp.additive_restore_atol, targets="all-linear", **opts)


def test_on_a_4bit_base_the_adapter_runs_and_merging_is_refused():
    """On a Linear4bit base LoKr adds ΔW x to the 4-bit layer's output; merging into it refuses, unchanged."""
    pp.on_a_4bit_base(LoKrLinear, lambda layer: layer.add("a", factor_shapes(33, 70, 2), 1.0, init_weights=False),
                   pp.adds_delta_w, "LoKr's ΔW")


def test_cached_generate_equals_uncached_greedy_loop(ckpt):
    pp.generates_as_uncached(LOKR, ckpt)


# -- PEFT parity ------------------------------------------------------------------------------------

PARITY = {  # family, options on both sides (None targets: PEFT's default for the family)
    "smollm": ("smollm", dict(r=8, alpha=8, targets=None)),
    "qwen3-r4": ("qwen3", dict(r=4, alpha=2, targets=None)),
    "qwen3-all-linear-both": ("qwen3", dict(r=2, alpha=5, targets="all-linear", decompose_both=True)),
    "smollm-mlp-factor": ("smollm", dict(r=1, alpha=16, targets=["gate_proj", "down_proj"], decompose_factor=4)),
    "smollm-lycoris": ("smollm", dict(r=3, alpha=3, targets=None, init_weights="lycoris", rank_dropout_scale=True)),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_and_gradients_match_peft(tmp_path, case):
    family, opts = PARITY[case]
    _, model, peft = pp.twins(LOKR, tmp_path, family, **opts)
    pp.trains_as_peft(LOKR, model, peft)


def test_merging_matches_peft(tmp_path):
    """merge_and_unload on both sides: the same folded weights (within the parity tolerance)."""
    _, model, peft = pp.twins(LOKR, tmp_path, "qwen3", r=2, decompose_both=True, targets="all-linear")
    pp.merged_as_peft(model, peft)


# -- folders ----------------------------------------------------------------------------------------

FOLDERS = {  # family, options on both sides
    "smollm-defaults": ("smollm", dict(targets=None)),
    "qwen3-list-both": ("qwen3", dict(r=2, alpha=2, targets=["k_proj", "down_proj"], decompose_both=True)),
    "qwen3-regex-factor": ("qwen3", dict(r=2, alpha=8, targets=r"model\.layers\.1\..*_proj", decompose_factor=8)),
    "smollm-layer-lycoris": ("smollm", dict(r=3, alpha=3, targets=["q_proj", "up_proj"], layers=[1],
                                            init_weights="lycoris", rank_dropout_scale=True)),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, case):
    pp.peft_folder_loads(LOKR, tmp_path, *FOLDERS[case])


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, case):
    """PeftModel.from_pretrained reads our folder, adapts the same modules with the same factors and gives our
    logits; our folder loads back here bit for bit, merged or not."""
    pp.our_folder_loads(LOKR, tmp_path, *FOLDERS[case])


@pytest.mark.parametrize("opts", [dict(), dict(r=2, decompose_both=True, decompose_factor=4, init_weights="lycoris",
                                               rank_dropout_scale=True, alpha=3)])
def test_folder_keys_and_config_are_peft_s(ckpt, tmp_path, opts):
    """The file holds exactly PEFT's keys and shapes, and adapter_config.json every field PEFT writes for
    LOKR (but peft_version, which PEFT stamps itself), with the same values."""
    peft = LOKR.peft(make_checkpoint(tmp_path / "hf", "smollm")[1], **opts)
    ours, _ = pp.saved_as_peft_saves(mc.apply_lokr(mc.load_model(ckpt), verbose=False, **opts), peft, tmp_path)
    assert {k.rsplit(".", 1)[-1] for k in ours} <= set(FACTORS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lokr_w1" in ours  # 4 < 8/2 fails: w1 is full


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, message", pp.not_a_linear("LoKr"))
def test_a_target_that_is_not_a_linear_is_one_line_naming_it(ckpt, targets, message):
    error = pp.attach_refused(LOKR, ckpt, dict(targets=targets), "^cannot attach LoKr: ")
    assert error.startswith(f"cannot attach LoKr: {message}") and pp.LINEARS_HERE in error


@pytest.mark.parametrize("opts, message", [
    (dict(r=0), "LoKr rank r must be a positive integer, found 0"),
    (dict(init_weights="gaussian"), "LoKr init_weights must be True, False or 'lycoris', found 'gaussian'"),
    (dict(init_weights=1), "LoKr init_weights must be True, False or 'lycoris', found 1"),
    (dict(decompose_factor=0), "LoKr decompose_factor must be -1 or a positive integer, found 0"),
    (dict(decompose_factor=-2), "LoKr decompose_factor must be -1 or a positive integer, found -2"),
    (dict(decompose_factor=2.0), "LoKr decompose_factor must be -1 or a positive integer, found 2.0"),
    (dict(decompose_both="yes"), "LoKr decompose_both must be True or False, found 'yes'"),
])
def test_bad_options_are_one_line_before_anything_changes(ckpt, opts, message):
    assert pp.attach_refused(LOKR, ckpt, opts) == message


def test_the_registry_entry():
    entry = get_method("lokr")
    assert entry.peft_type == "LOKR" and entry.mergeable
    assert entry.defaults() == dict(r=8, alpha=8.0, targets=None, decompose_both=False, decompose_factor=-1)


@pytest.fixture
def saved(ckpt, tmp_path):
    return pp.saved_perturbed(LOKR, ckpt, tmp_path / "adapter", r=4)


def test_a_folder_that_does_not_fit_is_refused_before_anything_changes(ckpt, saved):
    """r = 4 on smollm: q_proj holds lokr_w1 (8, 8), lokr_w2_a (9, 4), lokr_w2_b (4, 9); v_proj lokr_w1 (4, 8),
    lokr_w2_a (6, 4), lokr_w2_b (4, 9) (see test_only_the_factors_are_trainable)."""
    config, good = pp.folder_contents(saved)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lokr_w2_b"
    q = "base_model.model.model.layers.0.self_attn.q_proj."
    pp.each_folder_refused(LOKR, ckpt, saved, [  # (config, tensors, message)
        (config, {**good, key: torch.ones(4, 8)}, rf"{key}: shape \(4, 8\), expected \(4, 9\)"),
        (config, {k: v for k, v in good.items() if k != key}, f"{key} is missing"),
        ({**config, "r": 3}, good, r"lokr_w2_a: shape \(9, 4\), expected \(9, 3\)"),
        ({**config, "r": 5}, good, r"keys are factors these options do not give: .*q_proj.lokr_w2_a \(.*q_proj "
                                   r"holds lokr_w1, lokr_w2 for r=5, decompose_both=False, decompose_factor=-1\)"),
        ({**config, "decompose_factor": 4}, good, r"lokr_w1: shape \(8, 8\), expected \(4, 4\)"),
        (config, {k: v for k, v in good.items() if k != q + "lokr_w1"} | {q + "lokr_w1_a": torch.ones(8, 4)},
         r"keys are factors these options do not give: .*q_proj.lokr_w1_a"),
        (config, {**good, "base_model.model.model.layers.0.mlp.up_proj.lokr_w1": torch.ones(8, 8)},
         r"1 keys match no LoKr linear of this model .*up_proj.lokr_w1 \(not selected by target_modules\)"),
        (config, {**good, q + "lokr_t2": torch.ones(4, 4, 1, 1)},
         "LoKr's keys are base_model.model.<module>.lokr_w1"),
        ({**config, "target_modules": ["input_layernorm"]}, good, "input_layernorm is a RMSNorm"),
        ({**config, "rank_dropout": 0.1}, good, r"rank_dropout=0.1 is not supported \(minicustom's LoKr leaves it"),
        *pp.unsupported(config, good, module_dropout=0.2, use_effective_conv2d=True, rank_pattern={"q_proj": 4},
                        alpha_pattern={"q_proj": 4}, exclude_modules=["v_proj"], modules_to_save=["lm_head"],
                        layers_pattern="layers"),
        ({**config, "r": "8"}, good, r"field 'r' must be a positive integer"),
        ({**config, "init_weights": "gaussian"}, good, r"field 'init_weights' must be true, false or \"lycoris\""),
        ({**config, "decompose_factor": 0}, good, r"field 'decompose_factor' must be -1 or a positive integer"),
        ({**config, "decompose_factor": 2.5}, good, r"field 'decompose_factor' must be -1 or a positive integer"),
        ({**config, "decompose_both": "yes"}, good, r"field 'decompose_both' must be true or false"),
        ({**config, "rank_dropout_scale": 1}, good, r"field 'rank_dropout_scale' must be true or false"),
    ])


# -- the command line -------------------------------------------------------------------------------

def test_train_generate_and_merge_from_the_command_line(setup, tmp_path, capsys):
    """`train sft --method lokr --r 2 --decompose-both --decompose-factor 4` exports a PEFT LOKR folder with
    those options; `generate --adapter` answers as the library does with it (three steps at lr 1e-2 moved w1 off
    zero); `merge` writes a plain checkpoint whose logits equal the adapted ones within the parity tolerance
    (merging rounds W0 + ΔW once)."""
    out = tmp_path / "run"
    config = pp.cli_train(setup, out, "--method", "lokr", "--r", "2", "--decompose-both", "--decompose-factor", "4",
                       "--lr", "1e-2")
    assert (config["peft_type"], config["r"], config["target_modules"]) == ("LOKR", 2, ["q_proj", "v_proj"])
    assert (config["decompose_both"], config["decompose_factor"]) == (True, 4)
    keys = load_file(out / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lokr_w2_a"].shape == (18, 2)  # 72 = 4·18
    pp.cli_generate_and_merge(setup, out, tmp_path, capsys)
