"""VeRA: invariants, the formula, the shared projections bit for bit, PEFT parity (logits, gradients, merging,
folders both ways), errors, and the command line.

Vectors are set to N(0, 1) (in name order, so two models with the same names get the same values): with A's
entries ~ U(±√(6/in)) (std ~0.17 at in = 72) and B's ~ U(±√(6/r)) (std ~0.35 at r = 16), an entry of
ΔW = Λ_b B Λ_d A is ~√r · 0.35 · 0.17 ≈ 0.2, as large as the tiny models' weights (std 0.2), so the logits
move by O(1) (checked), and a slice taken from the wrong end, a vector on the wrong side or a transposed
projection shows far above round-off.

Exactness and tolerances (fp32, eps = 1.2e-7):
- Projections: one CPU torch.Generator seeded with projection_prng_key, U(-bound, bound) with PEFT's bound
  computed in the same float order: bit-identical to PEFT's (torch.equal), for any seed and shapes.
- Identity at init and disabled adapters: λ_b = 0 makes ΔW x = λ_b ⊙ (...) = 0 exactly, and y + 0 = y; with
  no active adapter the forward is the base linear alone. Zero tolerance (torch.equal).
- PEFT parity: both sides compute W0 x + b + λ_b ⊙ B_sl (λ_d ⊙ A_sl x) with the same ops on the same tensors
  (the projections are equal bit for bit, not copied); only the base models' reduction orders can differ, a
  few ulps per op through 2-3 layers, about 1e-6 of the largest entry. Logits and every trainable gradient
  are compared after dividing by the reference's largest entry, atol 1e-5, rtol 0: ten times that bound,
  five orders below the adapter's own effect. Measured: logits and gradients 0.0 apart on all five parity
  cases (smollm, qwen3, qwen3 all-linear, smollm MLP, phi3 qkv_proj), and PEFT's init drawn draw for draw
  (init_weights=False on the same global seed) gives bit-identical vectors and 0.0 apart logits.
- Merging: ΔW = (λ_b ⊙ B)(λ_d ⊙ A) is one (out, r) @ (r, in) matmul (PEFT's expression), W0 + ΔW rounds once
  per entry, and the merged forward runs one matmul where the unmerged ran three: a few ulps per op through
  the layers, within the parity tolerance. Measured: 9.2e-7 to 3.2e-6 of the largest logit on the five
  parity cases, 4.3e-6 with every linear of smollm merged; against PEFT's merge_and_unload, 0.0 apart. Unmerging subtracts the same ΔW: each entry of W0 comes back within one
  rounding of |W0| + |ΔW|, so atol = 2·eps·max(|W0| + |ΔW|), rtol 0.
- Dropout: eval mode is the identity (exact); in train mode our F.dropout and PEFT's nn.Dropout draw the
  same masks from the same global seed in the same module order, so train-mode parity holds at the same
  tolerance (measured 0.0).
- Folders: saving and loading copy the vectors and projections bit for bit (or regenerate the projections
  bit for bit from the seed), so minicustom -> minicustom is exact and PEFT <-> minicustom keeps the parity
  tolerance.
"""

import json
import warnings

import peft_parity as pp
import pytest
import torch
from conftest import make_checkpoint, token_ids
from peft import PeftModel, VeraConfig
from peft.tuners.vera.model import _kaiming_init
from safetensors.torch import load_file, save_file

import minicustom as mc
from minicustom.methods import get_method
from minicustom.methods.vera import VeraLinear, VeraProjections, projections

A_KEY, B_KEY = "base_model.vera_A", "base_model.vera_B"
# Every vector := N(0, 1); save_projection=False makes PEFT warn that the seed will restore the pair (quiet).
VERA = pp.Method("VeRA", "vera", mc.apply_vera, VeraConfig, VeraLinear, (".vera_lambda_",), pp.normal(1.0),
                 to_peft=pp.renamed(dropout="vera_dropout"), quiet_peft=True)


def _shared(model, name="default") -> VeraProjections:
    return next(m for m in model.modules() if isinstance(m, VeraLinear)).vera_projections[name]


def _peft_pair(peft, name="default"):  # PEFT's shared pair: one BufferDict entry per adapter name
    return peft.base_model.vera_A[name], peft.base_model.vera_B[name]


# -- invariants and the formula --------------------------------------------------------------------

def test_identity_at_init_is_exact(ckpt):
    model = pp.exact_at_init(VERA, ckpt, r=16)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, VeraLinear) and not layer.vera_lambda_b["default"].any()
    assert torch.equal(layer.vera_lambda_d["default"], torch.full((16,), 0.1))


def test_formula_by_hand():
    """y = W0 x + b + Σ_active λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x))); none active: the base linear."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(13, 7)
    layer = VeraLinear(lin)
    pairs = {"a": projections(3, 20, 9, seed=1), "b": projections(5, 13, 7, seed=2)}
    for n, (a, b) in pairs.items():
        layer.add(n, VeraProjections(a, b), mc.VeraConfig(r=a.shape[0]))
    VERA.perturb(layer.named_parameters())
    x = torch.randn(4, 5, 13)

    def dw(n):
        a, b = pairs[n]
        lam_b, lam_d = layer.vera_lambda_b[n], layer.vera_lambda_d[n]
        return torch.diag(lam_b) @ b[:7] @ torch.diag(lam_d) @ a[:, :13]

    layer.active = ["a", "b"]
    expected = x @ (lin.weight + dw("a") + dw("b")).T + lin.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight("a"), dw("a"), atol=1e-6, rtol=1e-6)
    layer.active = []
    assert torch.equal(layer(x), lin(x))
    with pytest.raises(ValueError, match=r"do not cover a \(7, 13\) linear at r=3"):
        layer.add("c", VeraProjections(*projections(3, 12, 9, seed=1)), mc.VeraConfig(r=3))


@pytest.mark.parametrize("r, shape_in, shape_out, seed", [(16, 72, 88, 0), (5, 96, 96, 3), (256, 64, 24, 2**63 + 5),
                                                          (7, 13, 11, -4)])
def test_projections_are_peft_s_bit_for_bit(r, shape_in, shape_out, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a, b = _kaiming_init((r, shape_in), generator=g), _kaiming_init((shape_out, r), generator=g)
    ours = projections(r, shape_in, shape_out, seed)
    assert torch.equal(ours[0], a) and torch.equal(ours[1], b)
    assert not torch.equal(projections(r, shape_in, shape_out, seed + 1)[0], a)


def test_one_pair_of_the_largest_shapes_is_shared_and_kept_out_of_the_state_dict(tmp_path):
    """qwen3 all-linear: in features 64 (q, k, v, gate, up), 96 (o) and 88 (down); out features 96 (q), 48 (k,
    v), 64 (o, down) and 88 (gate, up): one A (r, 96) and one B (96, r), the same module in every layer."""
    path, _ = make_checkpoint(tmp_path, "qwen3")
    keys = set(mc.load_model(path).state_dict())
    model = mc.apply_vera(mc.load_model(path), r=6, targets="all-linear", verbose=False)
    layers = [m for m in model.modules() if isinstance(m, VeraLinear)]
    assert len(layers) == 14 and all(m.vera_projections["default"] is layers[0].vera_projections["default"]
                                     for m in layers)
    shared = _shared(model)
    assert shared.vera_A.shape == (6, 96) and shared.vera_B.shape == (96, 6)
    assert set(model.state_dict()) - keys == {n for n, _ in model.named_parameters() if ".vera_lambda_" in n}


@pytest.mark.parametrize("family", ["smollm", "qwen3"])
def test_only_the_vectors_are_trainable(tmp_path, capsys, family):
    """PEFT's default targets for both families: q_proj and v_proj in each of the 2 layers, λ_b (out) and λ_d (r)."""
    path, _ = make_checkpoint(tmp_path, family)
    model = mc.apply_vera(mc.load_model(path), r=4)
    expected = {}
    for i in range(model.config.num_hidden_layers):
        for m in ("q_proj", "v_proj"):
            out = model.model.layers[i].self_attn.get_submodule(m).out_features
            expected[f"model.layers.{i}.self_attn.{m}.vera_lambda_b.default"] = (out,)
            expected[f"model.layers.{i}.self_attn.{m}.vera_lambda_d.default"] = (4,)
    n, total = pp.trainable_shapes(model, expected)
    assert f"VeRA 'default': 4 modules, r=4, d_initial=0.1, trainable parameters {n:,} of {total:,}" in \
        capsys.readouterr().out


def test_base_and_projections_bit_identical_after_an_adamw_step(ckpt):
    model = mc.apply_vera(mc.load_model(ckpt), r=16, verbose=False)
    shared = _shared(model)
    a, b = shared.vera_A.clone(), shared.vera_B.clone()
    # λ_b = 0 at init: λ_d gets a zero gradient at the first step (weight decay still moves it)
    pp.adamw_moves_every_trainable(model)
    assert torch.equal(shared.vera_A, a) and torch.equal(shared.vera_B, b)


def test_disable_adapters_is_exactly_the_base(ckpt):
    pp.disabling_gives_the_base(VERA, ckpt, r=16)


def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w0(ckpt):
    pp.merge_unmerge_unload(VERA, ckpt, pp.additive_restore_atol, r=16, targets="all-linear")


def test_on_a_4bit_base_the_adapter_runs_and_merging_is_refused():
    pp.on_a_4bit_base(VeraLinear, lambda layer: layer.add("a", VeraProjections(*projections(4, 70, 33, seed=0)),
                                                          mc.VeraConfig(r=4, init_weights=False)),
                      pp.adds_delta_w, "VeRA's ΔW")


def test_cached_generate_equals_uncached_greedy_loop(ckpt):
    pp.generates_as_uncached(VERA, ckpt, r=16)


def test_two_adapters_each_with_its_own_pair(ckpt, tmp_path):
    """A second adapter of another rank gets its own pair (same seed, its own shapes); switching between them
    and saving either works; another seed or save_projection is refused, as PEFT refuses it."""
    model = mc.apply_vera(mc.load_model(ckpt), r=4, verbose=False)
    mc.apply_vera(model, r=8, targets=["q_proj"], adapter_name="b", verbose=False)
    VERA.perturb(model.named_parameters())
    assert _shared(model, "b").vera_A.shape == (8, 72) and _shared(model).vera_A.shape == (4, 72)
    ids = token_ids()
    with torch.no_grad():
        out_b = model(ids)  # the adapter attached last is the active one
        mc.set_adapter(model, "default")
        out_a = model(ids)
    assert not torch.equal(out_a, out_b)
    mc.save_adapter(model, tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        assert torch.equal(mc.load_adapter(mc.load_model(ckpt), tmp_path / "b")(ids), out_b)
    for kw, field in ((dict(projection_prng_key=1), "projection_prng_key=1"),
                      (dict(save_projection=False), "save_projection=False")):
        with pytest.raises(ValueError, match=f"cannot attach VeRA: {field}, but VeRA adapter 'default' of this model"):
            mc.apply_vera(model, r=4, adapter_name="c", verbose=False, **kw)
        assert "c" not in model.adapter_configs and not any("c" in m.adapters for m in model.modules()
                                                             if isinstance(m, VeraLinear))


# -- PEFT parity ------------------------------------------------------------------------------------

PARITY = {  # family, options on both sides (None targets: PEFT's default for the family)
    "smollm": ("smollm", dict(r=16, targets=None)),
    "qwen3": ("qwen3", dict(r=16, targets=None, projection_prng_key=7)),
    "qwen3-all-linear": ("qwen3", dict(r=5, targets="all-linear")),
    "smollm-mlp": ("smollm", dict(r=12, targets=["gate_proj", "down_proj"], d_initial=0.5)),
    "phi3-qkv": ("phi3", dict(r=16, targets=["qkv_proj"])),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_and_gradients_match_peft(tmp_path, case):
    family, opts = PARITY[case]
    _, model, peft = pp.twins(VERA, tmp_path, family, **opts)
    shared, (a, b) = _shared(model), _peft_pair(peft)
    assert torch.equal(shared.vera_A, a) and torch.equal(shared.vera_B, b)  # same seed: same pair, not copied
    pp.trains_as_peft(VERA, model, peft)


def test_init_weights_false_draws_what_peft_draws(tmp_path):
    """PEFT's order of draws: λ_d ~ torch.randn(r) per layer on the global RNG, in module order. From the same
    global seed both sides hold the same vectors (no copying) and give the same logits."""
    path, hf = make_checkpoint(tmp_path, "qwen3")
    torch.manual_seed(11)
    peft = VERA.peft(hf, r=8, target_modules="all-linear", init_weights=False)
    torch.manual_seed(11)
    model = mc.apply_vera(mc.load_model(path), r=8, targets="all-linear", init_weights=False, verbose=False)
    ours, theirs = VERA.params(model), VERA.params(peft)
    assert set(ours) == set(theirs) and all(torch.equal(p, theirs[n]) for n, p in ours.items())
    ids = token_ids()
    with torch.no_grad():
        pp.close(model(ids), peft(input_ids=ids).logits, "logits")


def test_dropout_matches_peft_in_train_mode_and_is_off_in_eval(tmp_path):
    path, hf = make_checkpoint(tmp_path, "smollm")
    peft = VERA.peft(hf, r=16, vera_dropout=0.3)
    VERA.perturb(peft.named_parameters())
    model = mc.apply_vera(mc.load_model(path), r=16, dropout=0.3, verbose=False)
    VERA.perturb(model.named_parameters())
    model.train(), peft.train()
    ids = token_ids()
    torch.manual_seed(3)
    out = model(ids)
    torch.manual_seed(3)
    pp.close(out, peft(input_ids=ids).logits, "train-mode logits")
    with torch.no_grad():
        assert (out - model(ids)).abs().max() > 1e-2  # other masks: dropout acts
        model.eval(), peft.eval()
        plain = mc.apply_vera(mc.load_model(path), r=16, verbose=False).eval()
        VERA.perturb(plain.named_parameters())
        assert torch.equal(model(ids), plain(ids))
        pp.close(model(ids), peft(input_ids=ids).logits, "eval-mode logits")


def test_merging_matches_peft(tmp_path):
    """merge_and_unload on both sides: the same folded weights (within the parity tolerance)."""
    _, model, peft = pp.twins(VERA, tmp_path, "qwen3", r=16, targets=["q_proj", "o_proj", "down_proj"])
    pp.merged_as_peft(model, peft)


# -- folders ----------------------------------------------------------------------------------------

FOLDERS = {  # family, options on both sides
    "smollm-defaults": ("smollm", dict()),
    "qwen3-list": ("qwen3", dict(r=4, targets=["k_proj", "down_proj"], projection_prng_key=123)),
    "qwen3-regex-seed-only": ("qwen3", dict(r=2, targets=r"model\.layers\.1\..*_proj", save_projection=False)),
    "smollm-layer": ("smollm", dict(r=3, targets=["q_proj", "up_proj"], layers=[1], d_initial=0.3)),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, case):
    family, opts = FOLDERS[case]
    model, peft, _ = pp.peft_folder_loads(VERA, tmp_path, family, opts)
    assert (A_KEY in load_file(tmp_path / "adapter/adapter_model.safetensors")) == opts.get("save_projection", True)
    assert all(torch.equal(x, y) for x, y in zip((_shared(model).vera_A, _shared(model).vera_B), _peft_pair(peft)))


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, case):
    """PeftModel.from_pretrained reads our folder, adapts the same modules and gives our logits; our folder
    loads back here bit for bit, merged or not."""
    pp.our_folder_loads(VERA, tmp_path, *FOLDERS[case])


@pytest.mark.parametrize("save_projection", [True, False])
def test_folder_keys_and_config_are_peft_s(ckpt, tmp_path, save_projection):
    """The file holds exactly PEFT's keys, shapes and (same seed) projection bytes, and adapter_config.json
    every field PEFT writes for VERA (but peft_version, which PEFT stamps itself), with the same values."""
    peft = VERA.peft(make_checkpoint(tmp_path / "hf", "smollm")[1], save_projection=save_projection)
    ours, theirs = pp.saved_as_peft_saves(
        mc.apply_vera(mc.load_model(ckpt), save_projection=save_projection, verbose=False), peft, tmp_path)
    assert "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b" in ours
    assert (A_KEY in ours) == save_projection
    for key in (A_KEY, B_KEY) if save_projection else ():
        assert torch.equal(ours[key], theirs[key]), key


def test_projections_in_a_seed_only_folder_are_ignored_as_peft_ignores_them(ckpt, tmp_path):
    """save_projection false but vera_A/vera_B in the file: PEFT warns and regenerates them from the seed; so
    does minicustom (the file's pair here is other random numbers, which would change the logits)."""
    hf = make_checkpoint(tmp_path / "hf", "smollm")[1]
    peft = VERA.peft(hf, r=16)
    VERA.perturb(peft.named_parameters())
    peft.save_pretrained(tmp_path / "adapter")
    folder = tmp_path / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "save_projection": False}))
    state = load_file(folder / "adapter_model.safetensors")
    save_file({**state, A_KEY: torch.randn(16, 72), B_KEY: torch.randn(72, 16)}, folder / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="save_projection is false, but .* holds base_model.vera_A"):
        model = mc.load_adapter(mc.load_model(ckpt), folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(make_checkpoint(tmp_path / "hf2", "smollm")[1], folder).eval()
    ids = token_ids()
    with torch.no_grad():
        pp.close(model(ids), peft.eval()(input_ids=ids).logits, "logits")
        pp.close(model(ids), theirs(input_ids=ids).logits, "logits")


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(targets=["q_proj", "nope"]), "cannot attach VeRA: target 'nope' matches no module"),
    (dict(targets=["input_layernorm"]), "cannot attach VeRA: model.layers.0.input_layernorm is a RMSNorm; VeRA "
                                        "targets nn.Linear"),
    (dict(r=0), "VeRA rank r must be a positive integer, found 0"),
    (dict(r=True), "VeRA rank r must be a positive integer, found True"),
    (dict(projection_prng_key=2**64), r"VeRA projection_prng_key must be an integer in \[-2\*\*63, 2\*\*64\), found"),
    (dict(projection_prng_key=1.5), "VeRA projection_prng_key must be an integer"),
    (dict(dropout=1.0), r"VeRA dropout must be a number in \[0, 1\), found 1.0"),
    (dict(d_initial=float("nan")), "VeRA d_initial must be a finite number, found nan"),
])
def test_bad_options_are_one_line_before_anything_changes(ckpt, kw, message):
    pp.attach_refused(VERA, ckpt, kw, message)


def test_the_registry_entry():
    entry = get_method("vera")
    assert entry.peft_type == "VERA" and entry.mergeable
    assert entry.defaults() == dict(r=256, d_initial=0.1, dropout=0.0, targets=None, projection_prng_key=0)


@pytest.fixture
def saved(ckpt, tmp_path):
    return pp.saved_perturbed(VERA, ckpt, tmp_path / "adapter", r=8)


def test_a_folder_that_does_not_fit_is_refused_before_anything_changes(ckpt, saved):
    config, good = pp.folder_contents(saved)
    key = "base_model.model.model.layers.1.self_attn.v_proj.vera_lambda_b"
    no_pair = {k: v for k, v in good.items() if k not in (A_KEY, B_KEY)}
    pp.each_folder_refused(VERA, ckpt, saved, [  # (config, tensors, message)
        (config, no_pair, "base_model.vera_A is missing, but save_projection is true in adapter_config.json"),
        (config, {k: v for k, v in good.items() if k != B_KEY}, "base_model.vera_B is missing"),
        (config, {**good, A_KEY: torch.ones(8, 71)}, r"base_model.vera_A has shape \(8, 71\), expected \(8, 72\)"),
        (config, {**good, B_KEY: torch.ones(24, 8)}, r"base_model.vera_B has shape \(24, 8\), expected \(72, 8\) "
                                                     r"\(r=8; the largest out features"),
        ({**config, "r": 4}, good, r"base_model.vera_A has shape \(8, 72\), expected \(4, 72\)"),
        ({**config, "r": 4}, no_pair, "base_model.vera_A is missing"),
        ({**config, "target_modules": ["q_proj", "up_proj"]}, good,
         r"base_model.vera_B has shape \(72, 8\), expected \(88, 8\)"),  # up_proj: (88, 72)
        (config, {**good, key: torch.ones(71)}, rf"{key}: shape \(71,\), expected \(24,\)"),
        (config, {k: v for k, v in good.items() if k != key}, f"{key} is missing"),
        (config, {**good, "base_model.model.model.layers.0.mlp.up_proj.vera_lambda_d": torch.ones(8)},
         r"1 keys match no VeRA linear of this model .*up_proj.vera_lambda_d \(not selected by target_modules\)"),
        (config, {**good, "base_model.vera_C": torch.ones(8)}, "VeRA's keys are base_model.model.<module>.vera_lambda"),
        ({**config, "target_modules": ["input_layernorm"]}, good, "input_layernorm is a RMSNorm"),
        ({**config, "projection_prng_key": "0"}, good, r"field 'projection_prng_key' must be an integer in "
                                                      r"\[-2\*\*63, 2\*\*64\) \(a torch.Generator seed\), found '0'"),
        ({**config, "projection_prng_key": 2**64}, no_pair, "field 'projection_prng_key' must be an integer"),
        ({**config, "projection_prng_key": 0.5}, good, "field 'projection_prng_key' must be an integer"),
        ({**config, "save_projection": "yes"}, good, "field 'save_projection' must be true or false"),
        ({**config, "vera_dropout": 1.5}, good, r"field 'vera_dropout' must be a number in \[0, 1\)"),
        ({**config, "d_initial": "x"}, good, "field 'd_initial' must be a finite number"),
        ({**config, "r": 0}, good, "field 'r' must be a positive integer"),
        *pp.unsupported(config, good, bias="all", fan_in_fan_out=True, modules_to_save=["lm_head"],
                        layers_pattern="h"),
    ])


def test_a_second_folder_with_another_seed_is_refused_by_field(ckpt, saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "projection_prng_key": 5}))
    model = mc.apply_vera(mc.load_model(ckpt), r=8, verbose=False)
    with pytest.raises(mc.AdapterError, match="projection_prng_key=5, but VeRA adapter 'default' of this model has 0"):
        mc.load_adapter(model, saved, adapter_name="second")
    assert list(model.adapter_configs) == ["default"]
    assert all(m.adapters == ["default"] for m in model.modules() if isinstance(m, VeraLinear))


# -- the command line -------------------------------------------------------------------------------

def test_train_generate_and_merge_from_the_command_line(setup, tmp_path, capsys):
    """`train sft --method vera --r 16` exports a PEFT VERA folder; `generate --adapter` answers as the library
    does with it (three steps at VeRA's lr, 1e-2, moved λ_b off zero); `merge` writes a plain checkpoint whose
    logits equal the adapted ones within the parity tolerance (merging rounds W0 + ΔW once)."""
    out = tmp_path / "run"
    config = pp.cli_train(setup, out, "--method", "vera", "--r", "16")
    assert (config["peft_type"], config["r"], config["target_modules"]) == ("VERA", 16, ["q_proj", "v_proj"])
    assert load_file(out / "adapter_model.safetensors")[A_KEY].shape == (16, 72)
    pp.cli_generate_and_merge(setup, out, tmp_path, capsys)
