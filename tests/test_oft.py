"""OFT: invariants, the formula, PEFT parity (logits, gradients, merging, folders both ways) and errors.

Each packed Q (oft_R.weight) is set to N(0, 0.1²) (PEFT's init_weights=False scale; in name order, so two models
with the same names get the same values): with blocks of 8 to 36, ‖Q_i‖₂ is O(1), so R is far from I and the
logits move by O(1) (checked), and a block transposed, a sign of Q flipped or the rotation put on the output
shows far above round-off.

Exactness and tolerances (fp32, eps = 1.2e-7):
- Identity at init and disabled adapters: Q = 0 gives R = I exactly on both paths (I + 2·0 + ... = I; solving
  (I + 0) R = I - 0 is exact), x I = x exactly (products by 0 and 1 are exact, adding zeros is exact), so the
  base linear sees x itself; with no active adapter it sees x. Zero tolerance (torch.equal).
- PEFT parity: both sides build the same Q, the same R (the same bmm / solve calls in the same order) and the
  same einsum, then the base linear: the same operations on the same tensors, and autograd on both sides. Logits
  and every trainable gradient are compared after dividing by the reference's largest entry, atol 1e-5, rtol 0
  (the LoHa file's bound: a few ulps per op over 2-3 layers is ~1e-6). Measured: 0.0 apart, logits and
  gradients, on all parity cases (Neumann, exact Cayley, COFT, block_share, PEFT's adjusted default).
- Merging: W0 Rᵀ is one more rounded product per entry (bs terms) and the merged forward multiplies x by
  W0 Rᵀ instead of (x R) by W0: the same triple product associated the other way, a few ulps of the largest
  logit through the layers, under the parity tolerance. Measured: 1.3e-6 to 1.7e-6 of the largest logit (PEFT's
  merge_and_unload against ours: 0 to 1.2e-7 of the largest weight). Unmerging solves W Rᵀ = W' per block, which is
  backward stable: each entry of W0 comes back within ~bs · eps · cond(R_i) · max|W0| (cond(R_i) = 1 for the exact
  Cayley R, up to 1.17 for the 5-term series at this scale); atol = 4 · bs · eps · cond · max|W0|, rtol 0.
  Measured: at most 0.11 of that bound.
- Folders: saving and loading copy Q bit for bit, so minicustom -> minicustom is exact and PEFT <-> minicustom
  keeps the parity tolerance.
"""

import json

import peft_parity as pp
import pytest
import torch
from conftest import make_checkpoint, token_ids
from peft import OFTConfig
from peft.tuners.oft.layer import OFTLayer
from safetensors.torch import save_file

import minicustom as mc
from minicustom.methods import get_method
from minicustom.methods.oft import OFTLinear, _nearest_divisor


def _peft_opts(opts):
    """Our apply_oft options -> PEFT's OFTConfig fields (PEFT wants the unset one of r / oft_block_size 0)."""
    out = pp.renamed()(opts)
    if "r" in out:
        out.setdefault("oft_block_size", 0)
    return out


# Every packed Q := N(0, 0.1²).
OFT = pp.Method("OFT", "oft", mc.apply_oft, OFTConfig, OFTLinear, (".oft_R.",), pp.normal(0.1), to_peft=_peft_opts)


def _skew(vec, bs):
    """Q = U - Uᵀ with vec filling U's strictly upper triangle row by row, written out."""
    u, i = torch.zeros(bs, bs), 0
    for row in range(bs):
        for col in range(row + 1, bs):
            u[row, col] = vec[i]
            i += 1
    return u - u.T


def _r_by_hand(vec, bs, terms):
    """terms 0: (I - Q)(I + Q)⁻¹; else PEFT's series I + 2Q + ... + 2Qⁿ⁻² + Qⁿ⁻¹ (n = 3 as n = 4)."""
    q, eye = _skew(vec, bs).double(), torch.eye(bs, dtype=torch.float64)
    if terms == 0:
        return (eye - q) @ torch.linalg.inv(eye + q)
    if terms <= 2:
        return eye + 2 * q if terms == 2 else eye
    last = max(terms - 1, 3)
    return eye + sum(2 * torch.linalg.matrix_power(q, k) for k in range(1, last)) + torch.linalg.matrix_power(q, last)


# -- invariants and the formula --------------------------------------------------------------------

@pytest.mark.parametrize("opts", [dict(), dict(use_cayley_neumann=False, r=9), dict(coft=True, block_share=True,
                                                                                      oft_block_size=8)])
def test_identity_at_init_is_exact(ckpt, opts):
    model = pp.exact_at_init(OFT, ckpt, **opts)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, OFTLinear) and not layer.oft_R["default"].weight.any()


@pytest.mark.parametrize("terms", [0, 1, 2, 3, 5, 7])
def test_formula_by_hand(terms):
    """y = (x R_a R_b) W0ᵀ + b, R = diag(R_1, ..., R_nb) from Q by Cayley (terms 0) or PEFT's series; the input is
    rotated, not the output; block_share repeats one block; none active: the base linear."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 7)
    layer = OFTLinear(lin)
    opts = dict(use_cayley_neumann=terms > 0, num_cayley_neumann_terms=max(terms, 1))
    layer.add("a", 4, mc.OFTConfig(r=3, init_weights=False, **opts))
    layer.add("b", 6, mc.OFTConfig(oft_block_size=6, block_share=True, init_weights=False, **opts))
    assert layer.oft_R["a"].weight.shape == (3, 6) and layer.oft_R["b"].weight.shape == (1, 15)
    x = torch.randn(4, 5, 12)

    def r_full(name):
        rot = layer.oft_R[name]
        blocks = [_r_by_hand(rot.weight[0 if rot.block_share else i], rot.block_size, terms) for i in range(rot.blocks)]
        return torch.block_diag(*blocks).float()

    layer.active = ["a", "b"]
    expected = x @ r_full("a") @ r_full("b") @ lin.weight.T + lin.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.active = []
    assert torch.equal(layer(x), lin(x))
    if terms == 0:  # the exact path is orthogonal, and the inverse of the series' limit (PEFT's two signs)
        r = r_full("a").double()
        torch.testing.assert_close(r.T @ r, torch.eye(12, dtype=torch.float64), atol=1e-6, rtol=0)
        q = _skew(layer.oft_R["a"].weight[0], 4).double()
        series = sum(2 * torch.linalg.matrix_power(q, k) for k in range(1, 60)) + torch.eye(4, dtype=torch.float64)
        assert torch.linalg.matrix_norm(q, 2) < 0.9  # so the series converges
        torch.testing.assert_close(series @ r[:4, :4], torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_coft_projects_q_onto_its_ball_in_place():
    """‖Q_i‖_F <= eps / √nb after a forward (Q_i rescaled onto the sphere when larger, kept when inside)."""
    torch.manual_seed(0)
    layer = OFTLinear(torch.nn.Linear(16, 5))
    layer.add("a", 4, mc.OFTConfig(oft_block_size=4, coft=True, eps=0.3))
    layer.active = ["a"]
    w = layer.oft_R["a"].weight
    with torch.no_grad():
        w.copy_(torch.tensor([[0.5] * 6, [0.01] * 6, [-1.0] * 6, [0.0] * 6]))
        before = w.clone()
    layer(torch.randn(2, 16))
    radius = 0.3 / 2  # eps / √(4 blocks)
    norms = torch.linalg.matrix_norm(torch.stack([_skew(v, 4) for v in w.detach()]))
    torch.testing.assert_close(norms, torch.tensor([radius, 0.01 * 12 ** 0.5, radius, 0.0]), atol=1e-6, rtol=0)
    assert torch.equal(w[1], before[1]) and torch.equal(w[3], before[3])
    torch.testing.assert_close(w[0] / w[0].norm(), before[0] / before[0].norm())  # direction kept


@pytest.mark.parametrize("family", ["smollm", "qwen3"])
def test_only_q_is_trainable(tmp_path, capsys, family):
    """PEFT's default targets for both families: q_proj and v_proj in each of the 2 layers, one packed Q each;
    PEFT's default block size 32 where it divides in_features (qwen3: 64), PEFT's adjusted 36 where not (72)."""
    path, _ = make_checkpoint(tmp_path, family)
    model = mc.apply_oft(mc.load_model(path))
    bs = 36 if family == "smollm" else 32
    nb = model.config.hidden_size // bs
    n, total = pp.trainable_shapes(model, {f"model.layers.{i}.self_attn.{m}.oft_R.default.weight": (nb, bs * (bs - 1) // 2)
                                        for i in range(model.config.num_hidden_layers) for m in ("q_proj", "v_proj")})
    assert f"OFT 'default': 4 modules, block size {bs}, trainable parameters {n:,} of {total:,}" in \
        capsys.readouterr().out


def test_the_default_block_size_moves_as_peft_s_does():
    """_nearest_divisor is PEFT's adjust_oft_parameters for every size up to 100 and every request up to 120."""
    for n in range(1, 101):
        for k in range(1, 121):
            assert _nearest_divisor(n, k) == OFTLayer.adjust_oft_parameters(None, n, k), (n, k)


def test_base_bit_identical_after_an_adamw_step(ckpt):
    pp.adamw_moves_every_trainable(mc.apply_oft(mc.load_model(ckpt), oft_block_size=8, verbose=False))


def test_disable_adapters_is_exactly_the_base(ckpt):
    pp.disabling_gives_the_base(OFT, ckpt)


def _restore_atol(layer, w0):
    """Unmerging solves W Rᵀ = W' per block: within 4 · bs · eps · cond(R_i) · max|W0| (the docstring's bound)."""
    cond = torch.linalg.cond(layer.oft_R["default"].blocks_r().double()).max().item()
    return 4 * layer.oft_R["default"].block_size * pp.EPS * cond * w0.abs().max().item()


@pytest.mark.parametrize("opts", [dict(oft_block_size=8), dict(r=4, use_cayley_neumann=False),
                                  dict(oft_block_size=4, block_share=True, coft=True, eps=0.2)])
def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w0(tmp_path, opts):
    path = make_checkpoint(tmp_path / "base", "qwen3")[0]  # in_features 64, 96 (o_proj) and 88 (down_proj)
    pp.merge_unmerge_unload(OFT, path, _restore_atol, targets="all-linear", **opts)


def test_two_active_adapters_rotate_in_turn_and_merging_them_is_refused(ckpt):
    """Rotations do not commute: with two adapters active in a layer, merging one would reorder them; refused
    before anything is merged. With one active, it merges."""
    model = mc.apply_oft(mc.load_model(ckpt), oft_block_size=8, verbose=False)
    mc.apply_oft(model, oft_block_size=12, adapter_name="b", verbose=False)
    OFT.perturb(model.named_parameters())
    mc.set_adapter(model, ["default", "b"])
    ids = token_ids()
    w = model.model.layers[0].self_attn.q_proj.weight.clone()
    with torch.no_grad():
        both = model(ids)
        with pytest.raises(ValueError, match=r"OFT rotations do not commute: merging 'default' into a layer that "
                                             r"also applies \['b'\]"):
            mc.merge_adapters(model)
        assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, w) and torch.equal(model(ids), both)
        mc.set_adapter(model, "b")
        alone = model(ids)
        mc.merge_adapters(model)
        pp.close(model(ids), alone, "merged b")


def test_on_a_4bit_base_the_input_is_rotated_and_merging_is_refused():
    layer, q, x = pp.on_a_4bit_base(
        OFTLinear, lambda layer: layer.add("a", 16, mc.OFTConfig(oft_block_size=16, init_weights=False)),
        lambda layer, q, x: q(layer.oft_R["a"](x)), "OFT's rotation", in_features=64, atol=0)
    with torch.no_grad():
        assert (layer(x) - q(x)).abs().max() > 0.1


def test_cached_generate_equals_uncached_greedy_loop(ckpt):
    pp.generates_as_uncached(OFT, ckpt)


# -- PEFT parity ------------------------------------------------------------------------------------

PARITY = {  # family, options on both sides (no targets: PEFT's default for the family)
    "smollm-defaults": ("smollm", dict()),  # oft_block_size 32, adjusted to 36 on 72 features by both
    "qwen3-neumann": ("qwen3", dict(oft_block_size=16, num_cayley_neumann_terms=7)),
    "qwen3-exact": ("qwen3", dict(r=4, use_cayley_neumann=False)),
    "qwen3-coft": ("qwen3", dict(oft_block_size=8, coft=True, eps=1.0)),
    "qwen3-all-linear-shared": ("qwen3", dict(oft_block_size=8, block_share=True, targets="all-linear")),
    "smollm-mlp": ("smollm", dict(r=2, num_cayley_neumann_terms=3, targets=["gate_proj", "down_proj"])),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_and_gradients_match_peft(tmp_path, case):
    family, opts = PARITY[case]
    _, model, peft = pp.twins(OFT, tmp_path, family, **opts)
    pp.trains_as_peft(OFT, model, peft)


@pytest.mark.parametrize("opts", [dict(oft_block_size=16), dict(r=8, use_cayley_neumann=False)])
def test_merging_matches_peft(tmp_path, opts):
    """merge_and_unload on both sides: the same rotated weights (within the parity tolerance)."""
    _, model, peft = pp.twins(OFT, tmp_path, "qwen3", **opts)
    pp.merged_as_peft(model, peft)


# -- folders ----------------------------------------------------------------------------------------

FOLDERS = {  # family, options on both sides
    "smollm-defaults": ("smollm", dict()),
    "qwen3-list-exact": ("qwen3", dict(r=4, use_cayley_neumann=False, targets=["k_proj", "down_proj"])),
    "qwen3-regex-coft": ("qwen3", dict(oft_block_size=8, coft=True, eps=1.0, targets=r"model\.layers\.1\..*_proj")),
    "smollm-layer-shared": ("smollm", dict(oft_block_size=8, block_share=True, targets=["q_proj", "up_proj"],
                                           layers=[1])),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, case):
    pp.peft_folder_loads(OFT, tmp_path, *FOLDERS[case])


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, case):
    """PeftModel.from_pretrained reads our folder, adapts the same modules and gives our logits; our folder
    loads back here bit for bit, merged or not (with COFT a merged one within round-off: merging re-projects Q,
    which moves a Q on the sphere by an ulp, PEFT's too)."""
    family, opts = FOLDERS[case]
    pp.our_folder_loads(OFT, tmp_path, family, opts, merged_same=pp.within_tol if opts.get("coft") else None)


@pytest.mark.parametrize("opts", [dict(), dict(r=4, coft=True, block_share=True)])
def test_folder_keys_and_config_are_peft_s(ckpt, tmp_path, opts):
    """The file holds exactly PEFT's keys and shapes, and adapter_config.json every field PEFT writes for OFT
    with the same values (peft_version aside: ours names the oldest PEFT with this Cayley-Neumann series)."""
    peft = OFT.peft(make_checkpoint(tmp_path / "hf", "smollm")[1], **_peft_opts(opts))
    ours, _ = pp.saved_as_peft_saves(mc.apply_oft(mc.load_model(ckpt), verbose=False, **opts), peft, tmp_path,
                                  ours_version="0.18.0")
    assert "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight" in ours


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts, message", [
    (dict(oft_block_size=32), "model.layers.0.self_attn.q_proj has in_features 72, which oft_block_size=32 does not "
                              r"divide \(r × oft_block_size = in_features; its divisors: 1, 2, 3, 4, 6, 8, 9, 12, 18, "
                              r"24, 36, 72\) \(and 3 more\)"),
    (dict(r=5, targets=["down_proj"]), "model.layers.0.mlp.down_proj has in_features 88, which r=5 blocks does not "
                                       "divide"),
    (dict(oft_block_size=8, targets=["q_proj", "nope"]), "target 'nope' matches no module"),
    (dict(oft_block_size=8, targets=["input_layernorm"]), "model.layers.0.input_layernorm is a RMSNorm; OFT targets "
                                                          "nn.Linear"),
])
def test_a_target_that_does_not_fit_is_one_line_naming_it(ckpt, opts, message):
    error = pp.attach_refused(OFT, ckpt, opts, f"^cannot attach OFT: {message}")
    assert "linear modules here are named down_proj, gate_proj, k_proj" in error


@pytest.mark.parametrize("opts, message", [
    (dict(r=4, oft_block_size=8), r"OFT takes r \(blocks per module\) or oft_block_size \(their size\), not both"),
    (dict(r=0, oft_block_size=0), "OFT needs r .* or oft_block_size .*; both are 0"),
    (dict(r=-2), r"OFT r and oft_block_size must be positive integers \(0 or None: not set\), found r=-2"),
    (dict(oft_block_size=2.5), "found r=0, oft_block_size=2.5"),
    (dict(eps=0.0), r"OFT eps \(COFT's radius\) must be a positive number, found 0.0"),
    (dict(num_cayley_neumann_terms=0), "OFT num_cayley_neumann_terms must be a positive integer, found 0"),
    (dict(module_dropout=0.1), r"OFT module_dropout=0.1 is not supported \(only 0"),
    (dict(bias="all"), r"OFT bias='all' is not supported \(only 'none'"),
])
def test_bad_options_are_one_line_before_anything_changes(ckpt, opts, message):
    pp.attach_refused(OFT, ckpt, opts, message)


def test_the_registry_entry():
    entry = get_method("oft")
    assert entry.peft_type == "OFT" and entry.mergeable
    assert entry.defaults() == dict(r=None, oft_block_size=None, targets=None, coft=False, block_share=False)


@pytest.fixture
def saved(ckpt, tmp_path):
    return pp.saved_perturbed(OFT, ckpt, tmp_path / "adapter", oft_block_size=8)


def test_a_folder_that_does_not_fit_is_refused_before_anything_changes(ckpt, saved):
    config, good = pp.folder_contents(saved)
    key = "base_model.model.model.layers.1.self_attn.v_proj.oft_R.weight"
    no_size = {k: v for k, v in config.items() if k != "oft_block_size"}
    pp.each_folder_refused(OFT, ckpt, saved, [  # (config, tensors, message)
        (config, {**good, key: torch.ones(9, 27)}, rf"{key}: shape \(9, 27\), expected \(9, 28\) \(blocks, block"),
        (config, {k: v for k, v in good.items() if k != key}, f"{key} is missing"),
        ({**config, "oft_block_size": 12}, good, r"q_proj.oft_R.weight: shape \(9, 28\), expected \(6, 66\)"),
        ({**config, "block_share": True}, good, r"q_proj.oft_R.weight: shape \(9, 28\), expected \(1, 28\)"),
        (config, {**good, "base_model.model.model.layers.0.mlp.up_proj.oft_R.weight": torch.ones(9, 28)},
         r"1 keys match no OFT linear of this model .*up_proj.oft_R.weight \(not selected by target_modules\)"),
        (config, {**good, "base_model.model.model.layers.0.self_attn.q_proj.oft_r": torch.ones(8, 8)},
         "OFT's keys are base_model.model.<module>.oft_R.weight"),
        ({**config, "target_modules": ["input_layernorm"]}, good, "input_layernorm is a RMSNorm"),
        *pp.unsupported(config, good, module_dropout=0.2, bias="oft_only", fan_in_fan_out=True,
                        exclude_modules=["v_proj"], modules_to_save=["lm_head"]),
        ({**config, "layers_pattern": "layers", "layers_to_transform": [0, 1]}, good,
         r"layers_pattern='layers' is not supported"),
        ({**config, "r": 9}, good, "exactly one of 'r' and 'oft_block_size' must be non-zero, found r=9, "
                                   "oft_block_size=8"),
        ({**config, "r": "9"}, good, r"field 'r' must be an integer >= 0, found '9'"),
        ({**config, "eps": -1.0}, good, r"OFT eps \(COFT's radius\) must be a positive number, found -1.0"),
        ({**config, "num_cayley_neumann_terms": 0}, good, "field 'num_cayley_neumann_terms' must be a positive"),
        (no_size, good, "no field 'oft_block_size': a folder of PEFT < 0.14's OFT"),
        ({**config, "peft_version": "0.17.1"}, good, r"peft_version '0.17.1' with use_cayley_neumann: PEFT < 0.18.0"),
        ({k: v for k, v in config.items() if k != "peft_version"}, good, "no peft_version with use_cayley_neumann"),
        # PEFT moves a size that does not divide (32 on 72 features: 36, two blocks); these tensors are 8-blocks
        ({**config, "oft_block_size": 32}, good, r"q_proj.oft_R.weight: shape \(9, 28\), expected \(2, 630\)"),
    ])
    # an old version is fine with the exact Cayley transform, which did not change
    (saved / "adapter_config.json").write_text(json.dumps({**config, "peft_version": "0.17.1",
                                                           "use_cayley_neumann": False}))
    save_file(good, saved / "adapter_model.safetensors")
    assert isinstance(mc.load_adapter(mc.load_model(ckpt), saved).model.layers[0].self_attn.q_proj, OFTLinear)


# -- the command line -------------------------------------------------------------------------------

def test_train_generate_and_merge_from_the_command_line(setup, tmp_path, capsys):
    """`train sft --method oft --oft-block-size 8 --coft` exports a PEFT OFT folder; `generate --adapter` answers
    as the library does with it (three steps at lr 1e-2 moved Q off zero); `merge` writes a plain checkpoint
    whose logits equal the adapted ones within the parity tolerance (merging rounds W0 Rᵀ once)."""
    config = pp.cli_train(setup, tmp_path / "run", "--method", "oft", "--oft-block-size", "8", "--coft", "--lr", "1e-2")
    assert (config["peft_type"], config["r"], config["oft_block_size"], config["coft"], config["target_modules"]) \
        == ("OFT", 0, 8, True, ["q_proj", "v_proj"])
    pp.cli_generate_and_merge(setup, tmp_path / "run", tmp_path, capsys)
