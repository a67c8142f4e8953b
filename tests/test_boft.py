"""BOFT: invariants, the formula, PEFT parity (logits, gradients, dropout, merging, folders both ways) and errors.

PEFT's BOFT needs its CUDA extension (fbd_cuda) for more than one butterfly factor: without it (every CPU)
it silently trains with boft_n_butterfly_factor 1 (checked below). For the cases with m > 1, PEFT's
`_FBD_CUDA` is set to `FakeFbd`, a transcription of fbd_cuda_kernel.cu's two index formulas (output[z,
Ni·b + x, Ni·b + y] = input[z, Ni, x, y], and back), so that PEFT's own permutations, Cayley transform and
factor products are the oracle; m = 1 cases run PEFT's real CPU path.

Adapters are set to boft_R ~ N(0, 0.5²) and boft_s ~ 1 + N(0, 0.2²) (in name order, so two models with the
same names get the same values): each 4x4 block rotates by O(1) angles, so the logits move by O(1)-O(10)
(checked), and a permutation, transpose or scale applied wrongly shows far above round-off.

Exactness and tolerances (fp32, eps = 1.2e-7):
- Identity at init and disabled adapters: boft_R = 0 gives S = 0, Q = solve(I, I) = I exactly and R = I;
  x @ I is x exactly (each sum has one non-zero term) and y·1 is y: zero tolerance (torch.equal) on SmolLM's
  bias-free q_proj/v_proj. With a bias, PEFT's (y - b)·s + b rounds twice: each entry within eps·(|y| + 2|b|).
- Rotation pieces: the permutations are integers (compared exactly with PEFT's boft_P), and our gather
  B[p][:, p] moves entries where PEFT's bmm with 0/1 matrices adds exact zeros, so the Cayley output, the
  rotation and the random init draws equal PEFT's bit for bit (torch.equal).
- PEFT parity: after the rotation both sides run the same operations in the same order (x R, the linear, b
  off, ·s, b on), so the only room for a difference is a summation order, a few ulps per op over 2-3
  layers, ~1e-6 of the largest entry. Logits and every trainable gradient are compared after dividing by the
  reference's largest entry, atol 1e-5, rtol 0: ten times that, six orders below the adapter's own effect.
  Measured: 0.0 for the logits and every gradient of all five parity cases, both dropout cases, merging, and
  the folders both ways (the same operations on the same tensors give the same bits).
- Merging: s ⊙ (W0 Rᵀ) rounds each entry once per term of a row of R (at most k = 2^(m-1)·H non-zeros) and
  once for s, and the merged forward runs one matmul instead of x R then W0: a few ulps per op through the
  layers, within the parity tolerance (measured 2.3e-6 and 2.6e-6 of the largest logit). Unmerging
  multiplies by Rᵀ, which inverts R up to the solve's rounding (measured |RᵀR - I| ≤ 4.8e-7), and by 1/s:
  each entry of W0 comes back within a few roundings per term of max|W0|·max(s)/min(s); the test allows
  8·k·eps of that scale (measured: 0.28·k·eps for H = 4, 0.18·k·eps for H = 2, m = 3).
- Folders: saving and loading copy boft_R and boft_s bit for bit, so minicustom -> minicustom is exact and
  PEFT <-> minicustom keeps the parity tolerance.
"""

import json

import peft.tuners.boft.layer as peft_boft
import peft_parity as pp
import pytest
import torch
from conftest import make_checkpoint, token_ids
from peft import BOFTConfig

import minicustom as mc
from minicustom.cli import main
from minicustom.methods import get_method
from minicustom.methods.boft import BOFTLinear, butterfly_perm, cayley


class FakeFbd:
    """fbd_cuda's two kernels on the CPU: output[z, Ni·b + x, Ni·b + y] = input[z, Ni, x, y], and back."""

    @staticmethod
    def forward(x):  # (z, N, b, b) -> (z, N·b, N·b), zero off the diagonal blocks
        return [torch.stack([torch.block_diag(*blocks.unbind()) for blocks in x])]

    @staticmethod
    def backward(grad, x):  # (z, N·b, N·b) -> (z, N, b, b): the diagonal blocks
        b = x.shape[2]
        return [torch.stack([grad[:, i * b:(i + 1) * b, i * b:(i + 1) * b] for i in range(x.shape[1])], dim=1)]


@pytest.fixture
def fbd(monkeypatch):
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", FakeFbd())


def _peft_opts(opts):
    """Our options as PEFT's BOFTConfig fields (PEFT wants boft_block_size=0 spelled out)."""
    kw = pp.renamed()(opts)
    if kw.get("boft_block_num"):
        kw.setdefault("boft_block_size", 0)
    return kw


def _draw(name, p, g):
    """boft_R := N(0, 0.5²), boft_s := 1 + N(0, 0.2²)."""
    return 0.5 * torch.randn(p.shape, generator=g) if "boft_R" in name else 1 + 0.2 * torch.randn(p.shape, generator=g)


BOFT = pp.Method("BOFT", "boft", mc.apply_boft, BOFTConfig, BOFTLinear, (".boft_R", ".boft_s"), _draw,
                 to_peft=_peft_opts)


# -- invariants and the formula --------------------------------------------------------------------

def test_identity_at_init_is_exact(ckpt):
    """Exact on SmolLM's bias-free q_proj/v_proj; with a bias, PEFT's (y - b)·1 + b rounds twice: each entry
    within eps·(|y| + 2|b|) of y (u = eps/2)."""
    model = pp.exact_at_init(BOFT, ckpt)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, BOFTLinear) and torch.equal(layer.rotation("default"), torch.eye(layer.in_features))
    with torch.no_grad():
        layer = BOFTLinear(lin := torch.nn.Linear(24, 9))
        layer.add("a", mc.BOFTConfig())
        layer.active = ["a"]
        x = 4 * torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
        assert ((layer(x) - lin(x)).abs() <= pp.EPS * (lin(x).abs() + 2 * lin.bias.abs())).all()


def test_formula_by_hand():
    """in = 8, H = 2 (D = 4), m = 3. P_1 = I; P_2 interleaves pieces of H/2 = 1 within runs of 4, evens then
    odds: [0, 2, 1, 3 | 4, 6, 5, 7]; P_3 within the run of 8: [0, 2, 4, 6, 1, 3, 5, 7]. Q = (I - S)(I + S)⁻¹,
    S = (A - Aᵀ)/2 per block; R = M_3 M_2 M_1, M_i = P_i blockdiag(Q_i) P_iᵀ; y = s ⊙ (W0 Rᵀ x) + b. Two
    adapters compose, R = R_b R_a and s = s_b ⊙ s_a; none active: the base linear."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5)
    layer = BOFTLinear(lin)
    layer.add("a", mc.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3))
    layer.add("b", mc.BOFTConfig(boft_block_size=0, boft_block_num=2))
    BOFT.perturb(layer.named_parameters())
    perms = [list(range(8)), [0, 2, 1, 3, 4, 6, 5, 7], [0, 2, 4, 6, 1, 3, 5, 7]]
    assert layer.boft_perm["a"].tolist() == perms and layer.boft_perm["b"].tolist() == [list(range(8))]

    def rotation(n):
        R = torch.eye(8)
        for i, A in enumerate(layer.boft_R[n].detach()):
            S = (A - A.transpose(1, 2)) / 2  # (D, H, H)
            Q = [(torch.eye(len(s)) - s) @ torch.linalg.inv(torch.eye(len(s)) + s) for s in S]
            P = torch.eye(8)[perms[i] if n == "a" else list(range(8))]  # P[j, p[j]] = 1
            R = P @ torch.block_diag(*Q) @ P.T @ R
        return R

    for n in "ab":
        torch.testing.assert_close(rotation(n).T @ rotation(n), torch.eye(8), atol=1e-6, rtol=0)
        assert (rotation(n) - torch.eye(8)).abs().max() > 0.1 and (layer.boft_s[n] - 1).abs().max() > 0.1
    x = torch.randn(4, 3, 8)
    layer.active = ["a", "b"]
    R, s = rotation("b") @ rotation("a"), layer.boft_s["b"] * layer.boft_s["a"]
    expected = x @ (s * (lin.weight @ R.T)).T + lin.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.active = []
    assert torch.equal(layer(x), lin(x))


@pytest.mark.parametrize("n, cfg", [
    (64, dict(boft_block_size=4)), (64, dict(boft_block_size=4, boft_n_butterfly_factor=3)),
    (96, dict(boft_block_num=8, boft_n_butterfly_factor=4)), (88, dict(boft_block_size=2, boft_n_butterfly_factor=2)),
    (72, dict(boft_block_num=6, boft_n_butterfly_factor=2))])
def test_permutations_and_cayley_are_peft_s_bit_for_bit(n, cfg):
    """Our boft_P (from gathered indices) is PEFT's block_butterfly_perm + perm2mat, and our Cayley transform
    is its cayley_batch, bit for bit."""
    layer = BOFTLinear(torch.nn.Linear(n, 5))
    layer.add("a", mc.BOFTConfig(**{"boft_block_size": 0, **cfg}))
    m, D, H, _ = layer.boft_R["a"].shape
    theirs = torch.stack([peft_boft.BOFTLayer.perm2mat(None, peft_boft.BOFTLayer.block_butterfly_perm(
        None, n, int(D / 2 ** i), int(H / 2), m - 1)) for i in range(m)])
    assert torch.equal(layer.permutation_matrices("a"), theirs)
    A = 0.5 * torch.randn(m * D, H, H, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cayley(A), peft_boft.BOFTLayer.cayley_batch(None, A))
    assert butterfly_perm(n, D, H // 2, 0).tolist() == list(range(n))


def test_random_init_draws_are_peft_s(tmp_path):
    """init_weights=False: boft_R ~ N(0, 0.1²) then boft_s ~ N(1, 0.1²), module by module in PEFT's order, so
    the same seed gives PEFT's tensors bit for bit."""
    path, hf = make_checkpoint(tmp_path, "qwen3")
    torch.manual_seed(7)
    peft = BOFT.peft(hf, init_weights=False, target_modules="all-linear")
    torch.manual_seed(7)
    model = mc.apply_boft(mc.load_model(path), init_weights=False, targets="all-linear", verbose=False)
    ours, theirs = BOFT.params(model), BOFT.params(peft)
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert ours["model.layers.0.mlp.down_proj.boft_s.default"].std() > 0.05


@pytest.mark.parametrize("family", ["smollm", "qwen3"])
def test_only_boft_r_and_s_are_trainable(tmp_path, capsys, family):
    """PEFT's default targets: q_proj and v_proj in each of the 2 layers, boft_R (1, in/4, 4, 4) and boft_s (out, 1)."""
    path, _ = make_checkpoint(tmp_path, family)
    model = mc.apply_boft(mc.load_model(path))
    expected = {}
    for i in range(model.config.num_hidden_layers):
        for m in ("q_proj", "v_proj"):
            lin = model.model.layers[i].self_attn.get_submodule(m)
            expected[f"model.layers.{i}.self_attn.{m}.boft_R.default"] = (1, lin.in_features // 4, 4, 4)
            expected[f"model.layers.{i}.self_attn.{m}.boft_s.default"] = (lin.out_features, 1)
    n, total = pp.trainable_shapes(model, expected)
    assert (f"BOFT 'default': 4 modules, boft_block_size=4, boft_n_butterfly_factor=1, trainable parameters "
            f"{n:,} of {total:,}") in capsys.readouterr().out


def test_base_bit_identical_after_an_adamw_step(ckpt):
    pp.adamw_moves_every_trainable(mc.apply_boft(mc.load_model(ckpt), boft_n_butterfly_factor=2, verbose=False))


def test_disable_adapters_is_exactly_the_base(ckpt):
    pp.disabling_gives_the_base(BOFT, ckpt)


@pytest.mark.parametrize("opts", [dict(boft_block_size=4), dict(boft_block_size=2, boft_n_butterfly_factor=3)])
def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w0(tmp_path, opts):
    def restore_atol(m, w0):  # a few roundings per non-zero of a row of R, of max|W0|·max(s)/min(s)
        s, (_, _, H, _) = m.boft_s["default"], m.boft_R["default"].shape
        k = 2 ** (opts.get("boft_n_butterfly_factor", 1) - 1) * H  # non-zeros in a row of R
        return 8 * k * pp.EPS * (w0.abs().max() * s.max() / s.min()).item()

    path, _ = make_checkpoint(tmp_path, "llama-bias")
    pp.merge_unmerge_unload(BOFT, path, restore_atol, targets="all-linear", **opts)


def test_on_a_4bit_base_the_adapter_runs_and_merging_is_refused():
    """On a Linear4bit base: s ⊙ (W4 Rᵀ x) + b, PEFT's way (b taken off the 4-bit output and added back);
    merging refuses and changes nothing."""
    def expected(layer, q, x):
        R, s = layer.rotation("a"), layer.boft_s["a"].squeeze(-1)
        return s * (q(x @ R) - q.bias) + q.bias

    pp.on_a_4bit_base(BOFTLinear, lambda layer: layer.add("a", mc.BOFTConfig(boft_block_size=6, init_weights=False)),
                      expected, "BOFT's rotation", in_features=72)


def test_cached_generate_equals_uncached_greedy_loop(ckpt):
    pp.generates_as_uncached(BOFT, ckpt, boft_block_num=4)


# -- PEFT parity ------------------------------------------------------------------------------------

PARITY = {  # family, options on both sides (None targets: PEFT's default for the family)
    "smollm": ("smollm", dict(targets=None)),
    "qwen3-num": ("qwen3", dict(boft_block_num=8, targets=None)),
    "qwen3-butterfly": ("qwen3", dict(boft_block_num=8, boft_n_butterfly_factor=3, targets=None)),
    "llama-bias-all-linear": ("llama-bias", dict(boft_block_size=2, boft_n_butterfly_factor=2, targets="all-linear")),
    "smollm-mlp": ("smollm", dict(boft_block_size=8, targets=["gate_proj", "down_proj"])),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_and_gradients_match_peft(tmp_path, fbd, case):
    family, opts = PARITY[case]
    _, model, peft = pp.twins(BOFT, tmp_path, family, **opts)
    assert {n: p.shape for n, p in BOFT.params(model).items()} == {n: p.shape for n, p in BOFT.params(peft).items()}
    for n, layer in model.named_modules():
        if isinstance(layer, BOFTLinear):
            theirs = peft.get_submodule(pp.PREFIX + n)
            assert torch.equal(layer.permutation_matrices("default"), theirs.boft_P), n
            assert torch.equal(layer.rotation("default"), theirs.get_delta_weight("default")[0]), n
    pp.trains_as_peft(BOFT, model, peft)


def test_peft_without_its_cuda_extension_trains_one_butterfly_factor(tmp_path):
    """The docstring's claim: without fbd_cuda, PEFT's boft_R is (1, D, H, H) whatever the factor says."""
    peft = BOFT.peft(make_checkpoint(tmp_path, "smollm")[1], boft_block_size=4, boft_n_butterfly_factor=2)
    m = 1 if peft_boft.get_fbd_cuda() is None else 2  # 2 where the extension builds (CUDA_HOME, nvcc, ninja)
    assert {p.shape for n, p in BOFT.params(peft).items() if ".boft_R" in n} == {(m, 18, 4, 4)}


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_multiplicative_dropout_is_peft_s_draw_for_draw(tmp_path, fbd, p):
    """Training forwards with boft_dropout: the same global-generator draws as PEFT's (randint, then randperm,
    per module in forward order) give the same blocks set to I, so the logits and gradients match; in eval
    mode nothing is dropped (the forward equals the dropout-free one), nor when merging, and training forwards
    differ."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]  # down_proj: 88 = 11 blocks of 8
    _, model, peft = pp.twins(BOFT, tmp_path, "qwen3", boft_block_size=8, boft_n_butterfly_factor=2, boft_dropout=p,
                              targets=targets)
    ids = token_ids()
    model.train()
    peft.train()
    torch.manual_seed(5)
    ours = model(ids)
    torch.manual_seed(5)
    theirs = peft(input_ids=ids).logits
    pp.close(ours, theirs, "logits")
    probe = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2))
    (ours * probe).sum().backward()
    (theirs * probe).sum().backward()
    for n, q in BOFT.params(peft).items():
        pp.close(BOFT.params(model)[n].grad, q.grad, n)
    with torch.no_grad():
        assert (model(ids) - ours).abs().max() > 1e-3  # the next draws drop other blocks
        model.eval()
        clean = model(ids)
        for layer in model.modules():
            if isinstance(layer, BOFTLinear):
                layer.boft_dropout["default"] = 0.0
        model.train()
        assert torch.equal(model(ids), clean)
        for layer in model.modules():
            if isinstance(layer, BOFTLinear):
                layer.boft_dropout["default"] = p
        mc.merge_adapters(model)  # in training mode: merging never drops blocks
        pp.close(model.eval()(ids), clean, "merged")


def test_merging_matches_peft(tmp_path, fbd):
    """merge_and_unload on both sides: the same folded weights (within the parity tolerance)."""
    _, model, peft = pp.twins(BOFT, tmp_path, "qwen3", boft_block_size=4, boft_n_butterfly_factor=2,
                              targets="all-linear")
    pp.merged_as_peft(model, peft)


# -- folders ----------------------------------------------------------------------------------------

FOLDERS = {  # family, options on both sides
    "smollm-defaults": ("smollm", dict(targets=None)),
    "qwen3-list": ("qwen3", dict(boft_block_num=4, boft_n_butterfly_factor=2, targets=["k_proj", "down_proj"])),
    "qwen3-regex": ("qwen3", dict(boft_block_size=8, boft_dropout=0.1, targets=r"model\.layers\.1\..*_proj")),
    "smollm-layer": ("smollm", dict(boft_block_size=2, targets=["q_proj", "up_proj"], layers=[1])),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, fbd, case):
    pp.peft_folder_loads(BOFT, tmp_path, *FOLDERS[case])


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, fbd, case):
    """PeftModel.from_pretrained reads our folder, adapts the same modules and gives our logits; our folder
    loads back here bit for bit, merged or not."""
    pp.our_folder_loads(BOFT, tmp_path, *FOLDERS[case])


def test_folder_keys_and_config_are_peft_s(ckpt, tmp_path):
    """The file holds exactly PEFT's keys and shapes, and adapter_config.json every field PEFT writes for
    BOFT (but peft_version, which PEFT stamps itself), with the same values."""
    opts = dict(boft_block_num=6, boft_dropout=0.1)
    peft = BOFT.peft(make_checkpoint(tmp_path / "hf", "smollm")[1], **_peft_opts(opts))
    ours, _ = pp.saved_as_peft_saves(mc.apply_boft(mc.load_model(ckpt), verbose=False, **opts), peft, tmp_path)
    assert ours["base_model.model.model.layers.0.self_attn.q_proj.boft_R"].shape == (1, 6, 12, 12)


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts, message", [(dict(targets=t), m) for t, m in pp.not_a_linear("BOFT")[:2]])
def test_a_target_that_is_not_a_linear_is_one_line_naming_it(ckpt, opts, message):
    error = pp.attach_refused(BOFT, ckpt, opts, "^cannot attach BOFT: ")
    assert error.startswith(f"cannot attach BOFT: {message}") and pp.LINEARS_HERE in error


@pytest.mark.parametrize("opts, message", [
    (dict(boft_block_size=5), r"model.layers.0.self_attn.q_proj: in_features 72 is not divisible by "
                              r"boft_block_size 5 \(and 3 more\)"),
    (dict(boft_block_num=7, targets=["down_proj"]), "model.layers.0.mlp.down_proj: in_features 88 is not divisible "
                                                    "by boft_block_num 7"),
    (dict(boft_block_size=4, boft_n_butterfly_factor=3), r"model.layers.0.self_attn.q_proj: boft_n_butterfly_factor "
     r"3 needs an even block size and a number of blocks that is even and a multiple of 2\^2 = 4; in_features 72 "
     "with boft_block_size 4 gives 18 blocks of 4"),
    (dict(boft_block_num=8, boft_n_butterfly_factor=2, targets=["v_proj"]), "model.layers.0.self_attn.v_proj: "
     "boft_n_butterfly_factor 2 needs an even block size .* in_features 72 with boft_block_num 8 gives 8 blocks of 9"),
    (dict(boft_block_num=6, boft_n_butterfly_factor=3), "model.layers.0.self_attn.q_proj: boft_n_butterfly_factor 3 "
     r"needs .* a multiple of 2\^2 = 4; in_features 72 with boft_block_num 6 gives 6 blocks of 12"),
])
def test_blocks_that_do_not_fit_a_linear_are_one_line_naming_it_and_the_numbers(fbd, tmp_path, opts, message):
    """Refused before the model changes; PEFT (with its extension, so that m is honoured) refuses them too."""
    path, hf = make_checkpoint(tmp_path, "smollm")
    pp.attach_refused(BOFT, path, opts, f"^cannot attach BOFT: {message}")
    with pytest.raises(ValueError):
        BOFT.peft(hf, **_peft_opts(opts))


@pytest.mark.parametrize("opts, message", [
    (dict(boft_block_size=4, boft_block_num=8), "exactly one of boft_block_size and boft_block_num"),
    (dict(boft_block_size=0), "exactly one of boft_block_size and boft_block_num"),
    (dict(boft_block_size=-4), "exactly one of boft_block_size and boft_block_num"),
    (dict(boft_n_butterfly_factor=0), "boft_n_butterfly_factor must be a positive integer"),
    (dict(boft_dropout=1.0), r"boft_dropout must be a number in \[0, 1\), found 1.0"),
])
def test_bad_options_are_refused_before_anything_changes(ckpt, opts, message):
    pp.attach_refused(BOFT, ckpt, opts, message)


def test_the_registry_entry():
    entry = get_method("boft")
    assert entry.peft_type == "BOFT" and entry.mergeable
    assert entry.defaults() == dict(boft_block_size=None, boft_block_num=0, boft_n_butterfly_factor=1,
                                    boft_dropout=0.0, targets=None)


@pytest.fixture
def saved(ckpt, tmp_path):
    return pp.saved_perturbed(BOFT, ckpt, tmp_path / "adapter")


def test_a_folder_that_does_not_fit_is_refused_before_anything_changes(ckpt, saved):
    config, good = pp.folder_contents(saved)
    key = "base_model.model.model.layers.1.self_attn.v_proj.boft_s"
    r_key = "base_model.model.model.layers.0.self_attn.q_proj.boft_R"
    pp.each_folder_refused(BOFT, ckpt, saved, [  # (config, tensors, message)
        (config, {**good, key: torch.ones(23, 1)}, rf"{key}: shape \(23, 1\), expected \(24, 1\)"),
        (config, {k: v for k, v in good.items() if k != key}, f"{key} is missing"),
        ({**config, "boft_block_size": 6}, good, rf"{r_key}: shape \(1, 18, 4, 4\), expected \(1, 12, 6, 6\) "
                                                  r"\(boft_n_butterfly_factor, blocks, block size, block size\)"),
        ({**config, "boft_n_butterfly_factor": 2}, good, r"expected \(2, 18, 4, 4\)"),
        ({**config, "boft_block_size": 5}, good, "q_proj: in_features 72 is not divisible by boft_block_size 5"),
        ({**config, "boft_block_num": 4}, good, "exactly one of boft_block_size and boft_block_num"),
        ({**config, "boft_block_size": "4"}, good, "field 'boft_block_size' must be a non-negative integer"),
        ({**config, "boft_n_butterfly_factor": 0}, good, "field 'boft_n_butterfly_factor' must be a positive integer"),
        ({**config, "boft_dropout": 1.5}, good, r"field 'boft_dropout' must be a number in \[0, 1\)"),
        (config, {**good, "base_model.model.model.layers.0.mlp.up_proj.boft_s": torch.ones(88, 1)},
         r"1 keys match no BOFT linear of this model .*up_proj.boft_s \(not selected by target_modules\)"),
        (config, {**good, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(8, 72)},
         "BOFT's keys are base_model.model.<module>.boft_R"),
        ({**config, "target_modules": ["input_layernorm"]}, good, "input_layernorm is a RMSNorm"),
        *pp.unsupported(config, good, bias="boft_only", exclude_modules=["v_proj"], modules_to_save=["lm_head"],
                        layers_pattern="layers"),
    ])


# -- the command line -------------------------------------------------------------------------------

def test_train_and_merge_from_the_command_line(setup, tmp_path):
    """`train sft --method boft --boft-block-num 6 --boft-n-butterfly-factor 2` (alone: block size 0) exports
    a PEFT BOFT folder; `merge` writes a checkpoint with the adapted logits, within the parity tolerance."""
    root, path = setup
    out = tmp_path / "run"
    main(["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--out", str(out),
          "--method", "boft", "--boft-block-num", "6", "--boft-n-butterfly-factor", "2", "--max-length", "128",
          "--batch-size", "2", "--max-steps", "2", "--lr", "1e-2", "--exact-match", "0", "--seed", "1"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["boft_block_size"], config["boft_block_num"],
            config["boft_n_butterfly_factor"]) == ("BOFT", 0, 6, 2)
    ids = token_ids(1, 9, seed=4)
    model = mc.load_model(path)
    with torch.no_grad():
        base = model(ids)
        adapted = mc.load_adapter(model, out)(ids)
    assert not torch.equal(adapted, base)  # two steps at lr 1e-2 moved boft_R and boft_s
    main(["merge", "--model", str(path), "--adapter", str(out), "--out", str(tmp_path / "merged")])
    with torch.no_grad():
        pp.close(mc.load_model(tmp_path / "merged")(ids), adapted, "merged checkpoint")
