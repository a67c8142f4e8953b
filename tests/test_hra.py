"""HRA: invariants, the formula, PEFT parity (init, logits, gradients, merging, folders both ways), the
orthogonality regularizer and errors.

U is set to N(0, 1) (in name order, so two models with the same names get the same values; the scale does not
matter, each column is normalized): r random reflections move the logits by O(1) (checked), so a reflection
applied on the wrong side, in the wrong order or with a wrong factor shows far above round-off.

Exactness and tolerances (fp32, eps = 1.2e-7):
- Disabled adapters: with no active adapter the forward is the base linear alone. Zero tolerance (torch.equal).
- Identity at init (even r): each pair H(u) H(u) is I in exact arithmetic; in fp32 each of the r updates
  R <- R - 2 (R u) uᵀ rounds entries of size ≤ 1 (and ||u||² = 1 only to a few ulps), so |R - I| ≤ 4·r·eps
  entrywise (3.8e-6 at r = 8). Measured: 1.2e-7 (one ulp). The logits then move by that relative amount
  compounded over the layers: within the parity tolerance below. Measured: 1.4e-6 of the largest logit.
- PEFT parity: both sides compute PEFT's ops in PEFT's order (R = Π (R - 2 R u uᵀ), W0 R, x (W0 R)ᵀ + b), so
  the only freedom is the matmul kernels' summation order, which is the same on one machine. Logits and every
  trainable gradient are compared after dividing by the reference's largest entry, atol 1e-5, rtol 0 (a few
  ulps per op over 2-3 layers is ~1e-6; five orders below the adapter's own effect). Measured: 0.0 on all
  parity cases (plain, odd r, apply_GS, biases, the fused phi3 qkv_proj), logits and gradients; the init
  draws equal PEFT's bit for bit from the same seed.
- Merging: W <- W0 R is the very matrix the unmerged forward builds, so merged logits equal unmerged ones
  (measured 0.0; asserted with the parity tolerance). Unmerging multiplies by H_r ... H_1: (W0 R) R⁻¹ rounds
  twice through r reflections of norm 1, so each entry of W0 comes back within about (2r + 2)·eps·max|W0|·√in;
  we assert atol = 4·r·eps·max|W0|·√in (1.4e-5 and up at r = 5). Measured: 6.0e-7 (plain) and 5.4e-7
  (apply_GS) absolute on weights up to 0.83, a few ulps.
- The orthogonality regularizer is the same expression on the same tensors as the authors' loop over PEFT's
  parameters: compared with rtol 1e-6 (measured equal), and with values by hand (orthogonal columns: 0; the
  init pair (u, u): √2; unit columns at 60°: √2 / 2) at float32's default tolerance.
- Folders: saving and loading copy U bit for bit, so minicustom -> minicustom is exact and PEFT <-> minicustom
  keeps the parity tolerance.
"""

import math

import peft_parity as pp
import pytest
import torch
from conftest import make_checkpoint, token_ids
from peft import HRAConfig

import minicustom as mc
from minicustom.methods import get_method
from minicustom.methods.hra import HRALinear, orthogonality_loss

# Odd r on purpose in several tests: ours and PEFT's warning about the unpaired init (checked once, below).
pytestmark = [pytest.mark.filterwarnings("ignore:HRA. r=.* is odd"),
              pytest.mark.filterwarnings("ignore:The symmetric initialization can NOT")]

# Every U := N(0, 1).
HRA = pp.Method("HRA", "hra", mc.apply_hra, HRAConfig, HRALinear, (".hra_u",), pp.normal(1.0),
             to_peft=pp.renamed(apply_gs="apply_GS"))


def _reflections(u):
    """H_1 ... H_r by the paper's formula, each H_i = I - 2 u_i u_iᵀ / ||u_i||², in float64."""
    u = u.detach().double()
    r = torch.eye(u.shape[0], dtype=torch.float64)
    for i in range(u.shape[1]):
        ui = u[:, i:i + 1]
        r = r @ (torch.eye(u.shape[0], dtype=torch.float64) - 2 * ui @ ui.T / (ui.T @ ui))
    return r


# -- invariants and the formula --------------------------------------------------------------------

def test_identity_at_init_for_even_r(ckpt):
    """PEFT's symmetric init: columns in equal pairs, so R = I up to rounding; odd r, init_weights=False and
    apply_GS (the pair's second column orthogonalizes to noise) are not the identity."""
    base = mc.load_model(ckpt)
    model = mc.apply_hra(mc.load_model(ckpt), verbose=False)
    layer = model.model.layers[0].self_attn.q_proj
    u = layer.hra_u["default"]
    assert isinstance(layer, HRALinear) and u.shape == (72, 8)
    assert torch.equal(u[:, 0::2], u[:, 1::2]) and not torch.equal(u[:, 0], u[:, 2])
    eye = torch.eye(72)
    torch.testing.assert_close(layer.rotation("default"), eye, atol=4 * 8 * pp.EPS, rtol=0)
    ids = token_ids()
    with torch.no_grad():
        pp.close(model(ids), base(ids), "identity at init")
        for kw in (dict(init_weights=False), dict(apply_gs=True), dict(r=3)):
            other = mc.apply_hra(mc.load_model(ckpt), **kw, verbose=False)
            assert (other.model.layers[0].self_attn.q_proj.rotation("default") - eye).abs().max() > 0.1, kw
            assert (other(ids) - base(ids)).abs().max() > 0.1, kw


def test_odd_r_warns_as_peft_does(ckpt):
    with pytest.warns(UserWarning, match="r=5 is odd, so the symmetric init cannot pair the reflections"):
        mc.apply_hra(mc.load_model(ckpt), r=5, verbose=False)


@pytest.mark.parametrize("kw", [dict(r=8), dict(r=5), dict(r=4, init_weights=False)])
def test_init_draws_equal_peft_s_from_the_same_seed(tmp_path, kw):
    """Kaiming-uniform (a = √5) on (in, r/2) repeated column-wise for even r, on (in, r) otherwise: the same
    draws, in the same module order, as PEFT's."""
    path, hf = make_checkpoint(tmp_path, "qwen3")
    torch.manual_seed(7)
    peft = HRA.peft(hf, target_modules="all-linear", **kw)
    torch.manual_seed(7)
    model = mc.apply_hra(mc.load_model(path), targets="all-linear", verbose=False, **kw)
    ours, theirs = HRA.params(model), HRA.params(peft)
    assert set(ours) == set(theirs) and len(ours) == 14
    for n in ours:
        assert torch.equal(ours[n], theirs[n]), n


def test_formula_by_hand():
    """y = W0 H_1 ... H_r x + b; two active adapters chain, W0 R_a R_b x + b; R is orthogonal, reverse is its
    inverse; apply_GS is the product of the reflections through Gram-Schmidt(U)'s orthonormal columns."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(13, 7)
    layer = HRALinear(lin)
    layer.add("a", 3, init_weights=False)
    layer.add("b", 2, init_weights=False)
    layer.add("gs", 4, apply_gs=True, init_weights=False)
    HRA.perturb(layer.named_parameters())
    x = torch.randn(4, 5, 13)
    w0 = lin.weight.detach().double()
    ra, rb = _reflections(layer.hra_u["a"]), _reflections(layer.hra_u["b"])

    layer.active = ["a", "b"]
    expected = x.double() @ (w0 @ ra @ rb).T + lin.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    for n in ("a", "b", "gs"):
        r, back = layer.rotation(n).double(), layer.rotation(n, reverse=True).double()
        torch.testing.assert_close(r @ r.T, torch.eye(13, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(r @ back, torch.eye(13, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.rotation("a").double(), ra, atol=1e-6, rtol=0)
    q, _ = torch.linalg.qr(layer.hra_u["gs"].detach().double())  # ±Gram-Schmidt's columns: the same reflections
    torch.testing.assert_close(layer.rotation("gs").double(), _reflections(q), atol=1e-6, rtol=0)
    assert (layer.rotation("gs").double() - _reflections(layer.hra_u["gs"])).abs().max() > 0.1  # U is not orthogonal
    layer.active = []
    assert torch.equal(layer(x), lin(x))


@pytest.mark.parametrize("family", ["smollm", "qwen3"])
def test_only_u_is_trainable(tmp_path, capsys, family):
    """PEFT's default targets for both families: q_proj and v_proj in each of the 2 layers, U (in, r) each."""
    path, _ = make_checkpoint(tmp_path, family)
    model = mc.apply_hra(mc.load_model(path), r=4)
    n, total = pp.trainable_shapes(model, {f"model.layers.{i}.self_attn.{m}.hra_u.default": (model.config.hidden_size, 4)
                                        for i in range(model.config.num_hidden_layers) for m in ("q_proj", "v_proj")})
    assert f"HRA 'default': 4 modules, r=4, apply_gs=False, trainable parameters {n:,} of {total:,}" in \
        capsys.readouterr().out


def test_base_bit_identical_after_an_adamw_step(ckpt):
    pp.adamw_moves_every_trainable(mc.apply_hra(mc.load_model(ckpt), verbose=False))


def test_disable_adapters_is_exactly_the_base(ckpt):
    pp.disabling_gives_the_base(HRA, ckpt)


@pytest.mark.parametrize("apply_gs", [False, True])
def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w0(ckpt, apply_gs):
    pp.merge_unmerge_unload(HRA, ckpt, lambda m, w0: 4 * 5 * pp.EPS * w0.abs().max().item() * math.sqrt(m.in_features),
                         r=5, apply_gs=apply_gs, targets="all-linear")


def test_two_adapters_merge_in_order_and_unmerge_in_reverse(ckpt):
    model = mc.apply_hra(mc.load_model(ckpt), r=3, verbose=False)
    mc.apply_hra(model, r=2, apply_gs=True, adapter_name="b", verbose=False)
    HRA.perturb(model.named_parameters())
    mc.set_adapter(model, ["default", "b"])
    layer = model.model.layers[1].self_attn.v_proj
    w0 = layer.weight.detach().clone()
    ids = token_ids()
    with torch.no_grad():
        before = model(ids)
        expected = w0.double() @ _reflections(layer.hra_u["default"]) @ layer.rotation("b").double()
        mc.merge_adapters(model)
        torch.testing.assert_close(layer.weight.double(), expected, atol=1e-5, rtol=0)
        pp.close(model(ids), before, "two merged")
        mc.unmerge_adapters(model)
        torch.testing.assert_close(layer.weight, w0, atol=1e-5, rtol=0)


def test_on_a_4bit_base_the_adapter_runs_and_merging_is_refused():
    """On a Linear4bit base W0 R x + b is the 4-bit layer applied to R x; merging into it refuses, unchanged."""
    layer, q, x = pp.on_a_4bit_base(HRALinear, lambda layer: layer.add("a", 3, init_weights=False),
                                 lambda layer, q, x: q(x @ layer.rotation("a").T), "HRA's rotation")
    with torch.no_grad():
        assert (layer(x) - q(x)).abs().max() > 0.1


def test_cached_generate_equals_uncached_greedy_loop(ckpt):
    pp.generates_as_uncached(HRA, ckpt)


# -- PEFT parity ------------------------------------------------------------------------------------

PARITY = {  # family, options on our side (None targets: PEFT's default for the family)
    "smollm": ("smollm", dict(r=8, targets=None)),
    "qwen3-all-linear-odd": ("qwen3", dict(r=3, targets="all-linear")),
    "smollm-gs-mlp": ("smollm", dict(r=4, apply_gs=True, targets=["gate_proj", "down_proj"])),
    "llama-bias": ("llama-bias", dict(r=6, targets=["q_proj", "o_proj", "up_proj"])),
    "phi3-fused": ("phi3", dict(r=2, targets=["qkv_proj", "gate_up_proj"])),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_and_gradients_match_peft(tmp_path, case):
    family, opts = PARITY[case]
    _, model, peft = pp.twins(HRA, tmp_path, family, **opts)
    pp.trains_as_peft(HRA, model, peft)


@pytest.mark.parametrize("apply_gs", [False, True])
def test_merging_and_unmerging_match_peft(tmp_path, apply_gs):
    """merge_adapter (W0 R) and unmerge (W H_r ... H_1) on both sides: the same weights (parity tolerance)."""
    _, model, peft = pp.twins(HRA, tmp_path, "qwen3", r=4, apply_gs=apply_gs, targets="all-linear")

    def weights(m):
        return {n.removeprefix(pp.PREFIX).replace(".base_layer", ""): p for n, p in m.named_parameters()
                if not p.requires_grad}

    with torch.no_grad():
        mc.merge_adapters(model)
        peft.base_model.merge_adapter()
        ours, theirs = weights(model), weights(peft)
        assert set(ours) == set(theirs)
        for n in ours:
            pp.close(ours[n], theirs[n], f"merged {n}")
        mc.unmerge_adapters(model)
        peft.base_model.unmerge_adapter()
        for n, p in weights(model).items():
            pp.close(p, weights(peft)[n], f"unmerged {n}")
    merged, ref = mc.merge_adapter(model), peft.merge_and_unload()
    for n, p in merged.named_parameters():
        pp.close(p, dict(ref.named_parameters())[n], n)


# -- the orthogonality regularizer ------------------------------------------------------------------

def _authors_regularizer(peft, lamda):
    """The HRA authors' loop (DaShenZi721/HRA llama/finetune_32.py), over PEFT's parameters."""
    loss = 0
    for name, param in peft.named_parameters():
        if "hra_u" in name:
            u_norm = param / param.norm(dim=0)
            loss = loss + lamda * torch.norm(torch.eye(u_norm.size(1)) - u_norm.t() @ u_norm)
    return loss


def test_orthogonality_loss_equals_the_authors_on_peft_s_parameters(tmp_path):
    path, hf = make_checkpoint(tmp_path / "base", "qwen3")
    peft = HRA.peft(hf, r=6, target_modules="all-linear")
    model = mc.apply_hra(mc.load_model(path), r=6, targets="all-linear", verbose=False)
    HRA.copy_peft_into(model, peft)
    torch.testing.assert_close(orthogonality_loss(model), _authors_regularizer(peft, 1e-4), rtol=1e-6, atol=0)
    HRA.perturb(peft.named_parameters())
    HRA.copy_peft_into(model, peft)
    ours, ref = orthogonality_loss(model, weight=1e-4), _authors_regularizer(peft, 1e-4)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert ours > 0 and torch.equal(orthogonality_loss(model, weight=2e-4), 2 * ours)
    ours.backward()
    ref.backward()
    theirs = HRA.params(peft)
    for n, p in HRA.params(model).items():
        pp.close(p.grad, theirs[n].grad, n)
    with torch.no_grad(), mc.disable_adapters(model):
        assert torch.equal(orthogonality_loss(model), torch.zeros(()))  # nothing active, nothing added
    assert torch.equal(orthogonality_loss(mc.load_model(path)), torch.zeros(()))


def test_orthogonality_loss_by_hand():
    """λ ||I_r - ÛᵀÛ||_F: orthogonal columns of any lengths cost 0; PEFT's init pair (u, u) gives I - ÛᵀÛ =
    [[0, -1], [-1, 0]], norm √2; unit columns at 60° give off-diagonals -cos 60° = -1/2, norm √2 / 2."""
    layer = HRALinear(torch.nn.Linear(9, 4))
    layer.add("a", 3, init_weights=False)
    layer.add("pair", 2)
    layer.add("60", 2, init_weights=False)
    model = torch.nn.Sequential(layer)
    with torch.no_grad():
        layer.hra_u["a"].copy_(torch.eye(9)[:, :3] * torch.tensor([2.0, -0.5, 3.0]))
        layer.hra_u["60"].copy_(torch.tensor([[1.0, 0.5], [0.0, math.sqrt(3) / 2]] + [[0.0, 0.0]] * 7) * 3)
    assert orthogonality_loss(model, adapter_names=["a"]) == 0
    layer.active = ["pair"]
    torch.testing.assert_close(orthogonality_loss(model, weight=0.5), torch.tensor(0.5 * math.sqrt(2)))
    torch.testing.assert_close(orthogonality_loss(model, weight=1.0, adapter_names=["60"]),
                               torch.tensor(math.sqrt(2) / 2))
    torch.testing.assert_close(orthogonality_loss(model, weight=1.0, adapter_names=["pair", "60", "a"]),
                               torch.tensor(1.5 * math.sqrt(2)))


# -- folders ----------------------------------------------------------------------------------------

FOLDERS = {  # family, options on both sides
    "smollm-defaults": ("smollm", dict(targets=None)),
    "qwen3-list-gs": ("qwen3", dict(r=4, apply_gs=True, targets=["k_proj", "down_proj"])),
    "qwen3-regex": ("qwen3", dict(r=2, targets=r"model\.layers\.1\..*_proj")),
    "smollm-layer-odd": ("smollm", dict(r=3, targets=["q_proj", "up_proj"], layers=[1])),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, case):
    pp.peft_folder_loads(HRA, tmp_path, *FOLDERS[case])


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, case):
    """PeftModel.from_pretrained reads our folder, adapts the same modules (apply_GS as ours) and gives our
    logits; our folder loads back here bit for bit, merged or not."""
    family, opts = FOLDERS[case]
    _, peft, _ = pp.our_folder_loads(HRA, tmp_path, family, opts)
    assert peft.peft_config["default"].apply_GS == opts.get("apply_gs", False)


def test_folder_keys_and_config_are_peft_s(ckpt, tmp_path):
    """The file holds exactly PEFT's keys and shapes, and adapter_config.json every field PEFT writes for
    HRA (but peft_version, which PEFT stamps itself), with the same values."""
    peft = HRA.peft(make_checkpoint(tmp_path / "hf", "smollm")[1])
    ours, _ = pp.saved_as_peft_saves(mc.apply_hra(mc.load_model(ckpt), verbose=False), peft, tmp_path)
    assert "base_model.model.model.layers.0.self_attn.q_proj.hra_u" in ours


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, message", pp.not_a_linear("HRA"))
def test_a_target_that_is_not_a_linear_is_one_line_naming_it(ckpt, targets, message):
    error = pp.attach_refused(HRA, ckpt, dict(targets=targets), "^cannot attach HRA: ")
    assert error.startswith(f"cannot attach HRA: {message}") and pp.LINEARS_HERE in error


@pytest.mark.parametrize("kw, message", [
    (dict(r=0), "HRA's number of reflections r must be a positive integer, found 0"),
    (dict(r="8"), "HRA's number of reflections r must be a positive integer, found '8'"),
    (dict(r=True), "HRA's number of reflections r must be a positive integer, found True"),
    (dict(apply_gs="yes"), "HRA's apply_gs must be True or False, found 'yes'"),
])
def test_bad_options_are_one_line_before_anything_changes(ckpt, kw, message):
    model = mc.load_model(ckpt)
    pp.attach_refused(HRA, ckpt, kw, f"^{message}$", model=model)
    mc.apply_hra(model, verbose=False)  # the refused attach left nothing that blocks the next one
    with pytest.raises(ValueError, match="^an adapter named 'default' already exists"):
        mc.apply_hra(model, r=2, verbose=False)


def test_the_registry_entry():
    entry = get_method("hra")
    assert entry.peft_type == "HRA" and entry.mergeable
    assert entry.defaults() == dict(r=8, apply_gs=False, targets=None)


@pytest.fixture
def saved(ckpt, tmp_path):
    return pp.saved_perturbed(HRA, ckpt, tmp_path / "adapter")


def test_a_folder_that_does_not_fit_is_refused_before_anything_changes(ckpt, saved):
    config, good = pp.folder_contents(saved)
    key = "base_model.model.model.layers.1.self_attn.v_proj.hra_u"
    pp.each_folder_refused(HRA, ckpt, saved, [  # (config, tensors, message)
        (config, {**good, key: torch.ones(71, 8)}, rf"{key}: shape \(71, 8\), expected \(72, 8\) \(in_features, r\)"),
        (config, {k: v for k, v in good.items() if k != key}, f"{key} is missing"),
        ({**config, "r": 4}, good, r"q_proj.hra_u: shape \(72, 8\), expected \(72, 4\)"),
        (config, {**good, "base_model.model.model.layers.0.mlp.up_proj.hra_u": torch.ones(72, 8)},
         r"1 keys match no HRA linear of this model .*up_proj.hra_u \(not selected by target_modules\)"),
        (config, {**good, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(8, 72)},
         "HRA's keys are base_model.model.<module>.hra_u"),
        ({**config, "target_modules": ["input_layernorm"]}, good, "input_layernorm is a RMSNorm"),
        ({**config, "bias": "all"}, good, r"bias='all' is not supported"),
        *pp.unsupported(config, good, bias="hra_only", exclude_modules=["v_proj"], modules_to_save=["lm_head"],
                        layers_pattern="layers"),
        ({**config, "r": "8"}, good, r"field 'r' must be a positive integer"),
        ({**config, "apply_GS": "yes"}, good, r"field 'apply_GS' must be true or false"),
        ({**config, "init_weights": 1}, good, r"field 'init_weights' must be true or false"),
    ])


# -- the command line -------------------------------------------------------------------------------

def test_train_generate_and_merge_from_the_command_line(setup, tmp_path, capsys):
    """`train sft --method hra --r 4 --apply-gs` exports a PEFT HRA folder; `generate --adapter` answers as the
    library does with it; `merge` writes a plain checkpoint whose logits equal the adapted ones within the
    parity tolerance."""
    config = pp.cli_train(setup, tmp_path / "run", "--method", "hra", "--r", "4", "--apply-gs", "--lr", "1e-2")
    assert (config["peft_type"], config["r"], config["apply_GS"], config["target_modules"]) == (
        "HRA", 4, True, ["q_proj", "v_proj"])
    pp.cli_generate_and_merge(setup, tmp_path / "run", tmp_path, capsys)
