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
import re

import peft.tuners.boft.layer as peft_boft
import pytest
import torch
from conftest import (
    adamw_step_changes,
    close_to_largest,
    disabled_is_the_base,
    greedy_uncached,
    make_checkpoint,
    matches_peft,
)
from conftest import token_ids as _ids
from peft import BOFTConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import minicustom as mc
from minicustom.cli import main
from minicustom.methods import apply_method, get_method
from minicustom.methods.boft import BOFTLinear, butterfly_perm, cayley

TOL = 1e-5  # logits and gradients against PEFT, divided by the reference's largest entry
PREFIX = "base_model.model."
EPS = torch.finfo(torch.float32).eps


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


@torch.no_grad()
def _perturb(named_params, seed=0):
    """boft_R := N(0, 0.5²), boft_s := 1 + N(0, 0.2²), in name order (PEFT's names without PREFIX equal ours)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted((n.removeprefix(PREFIX), p) for n, p in named_params):
        if "boft_R" in name:
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        elif "boft_s" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


def _params(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if ".boft_" in n}


@torch.no_grad()
def _copy(src, dst):
    theirs = _params(src)
    for n, p in _params(dst).items():
        p.copy_(theirs[n])


def _assert_adapter_matters(model, ids, out):
    with torch.no_grad(), mc.disable_adapters(model):
        assert (out - model(ids)).abs().max() > 0.1


def _peft(hf, **kw):
    return get_peft_model(hf, BOFTConfig(task_type="CAUSAL_LM", **kw))


def _peft_opts(opts):
    """Our options as PEFT's BOFTConfig fields (PEFT wants boft_block_size=0 spelled out)."""
    kw = {k: v for k, v in opts.items() if k not in ("targets", "layers")}
    if kw.get("boft_block_num"):
        kw.setdefault("boft_block_size", 0)
    kw["target_modules"] = opts.get("targets")
    return {**kw, "layers_to_transform": opts["layers"]} if "layers" in opts else kw


def _untouched(model):
    return not any(isinstance(m, BOFTLinear) for m in model.modules()) and not getattr(model, "adapter_configs", {})


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "base", "smollm")[0]


# -- invariants and the formula --------------------------------------------------------------------

def test_identity_at_init_is_exact(ckpt):
    """Exact on SmolLM's bias-free q_proj/v_proj; with a bias, PEFT's (y - b)·1 + b rounds twice: each entry
    within eps·(|y| + 2|b|) of y (u = eps/2)."""
    base = mc.load_model(ckpt)
    model = mc.apply_boft(mc.load_model(ckpt), verbose=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, BOFTLinear) and torch.equal(layer.rotation("default"), torch.eye(layer.in_features))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))
    noisy = mc.apply_boft(mc.load_model(ckpt), init_weights=False, verbose=False)
    with torch.no_grad():
        assert not torch.equal(noisy(ids), base(ids))
        layer = BOFTLinear(lin := torch.nn.Linear(24, 9))
        layer.add("a", mc.BOFTConfig())
        layer.active = ["a"]
        x = 4 * torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
        assert ((layer(x) - lin(x)).abs() <= EPS * (lin(x).abs() + 2 * lin.bias.abs())).all()


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
    _perturb(layer.named_parameters())
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
    peft = _peft(hf, init_weights=False, target_modules="all-linear")
    torch.manual_seed(7)
    model = mc.apply_boft(mc.load_model(path), init_weights=False, targets="all-linear", verbose=False)
    ours, theirs = _params(model), _params(peft)
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
    assert {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad} == expected
    n, total = mc.count_parameters(model)
    assert n == sum(torch.Size(s).numel() for s in expected.values())
    assert (f"BOFT 'default': 4 modules, boft_block_size=4, boft_n_butterfly_factor=1, trainable parameters "
            f"{n:,} of {total:,}") in capsys.readouterr().out


def test_base_bit_identical_after_an_adamw_step(ckpt):
    model = mc.apply_boft(mc.load_model(ckpt), boft_n_butterfly_factor=2, verbose=False).train()
    changed = adamw_step_changes(model, _ids())
    assert sorted(changed) == sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_disable_adapters_is_exactly_the_base(ckpt):
    base = mc.load_model(ckpt)
    model = apply_method(mc.load_model(ckpt), "boft")
    _perturb(model.named_parameters())
    ids = _ids()
    adapted = disabled_is_the_base(model, base, ids)
    with torch.no_grad():
        _assert_adapter_matters(model, ids, adapted)
        mc.merge_adapters(model)
        with pytest.raises(ValueError, match="merged into the base weights"), mc.disable_adapters(model):
            pass


@pytest.mark.parametrize("opts", [dict(boft_block_size=4), dict(boft_block_size=2, boft_n_butterfly_factor=3)])
def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w0(tmp_path, opts):
    path, _ = make_checkpoint(tmp_path, "llama-bias")
    base_keys = set(mc.load_model(path).state_dict())
    model = mc.apply_boft(mc.load_model(path), targets="all-linear", **opts, verbose=False)
    _perturb(model.named_parameters())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BOFTLinear)}
    w0 = {n: m.weight.detach().clone() for n, m in layers.items()}
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
        _assert_adapter_matters(model, ids, before)
        mc.merge_adapters(model)
        close_to_largest(model(ids), before, TOL, "merged")
        mc.unmerge_adapters(model)
        for n, m in layers.items():
            s, (_, _, H, _) = m.boft_s["default"], m.boft_R["default"].shape
            k = 2 ** (opts.get("boft_n_butterfly_factor", 1) - 1) * H  # non-zeros in a row of R
            atol = 8 * k * EPS * (w0[n].abs().max() * s.max() / s.min()).item()
            torch.testing.assert_close(m.weight, w0[n], atol=atol, rtol=0)
        plain = mc.merge_adapter(model)
        close_to_largest(plain(ids), before, TOL, "unloaded")
    assert set(plain.state_dict()) == base_keys and not any(isinstance(m, BOFTLinear) for m in plain.modules())


def test_on_a_4bit_base_the_adapter_runs_and_merging_is_refused():
    """On a Linear4bit base: s ⊙ (W4 Rᵀ x) + b, PEFT's way (b taken off the 4-bit output and added back);
    merging refuses and changes nothing."""
    torch.manual_seed(0)
    q = mc.Linear4bit.from_linear(torch.nn.Linear(72, 33))
    layer = BOFTLinear(q)
    layer.add("a", mc.BOFTConfig(boft_block_size=6, init_weights=False))
    layer.active = ["a"]
    x = torch.randn(3, 72)
    with torch.no_grad():
        R, s = layer.rotation("a"), layer.boft_s["a"].squeeze(-1)
        torch.testing.assert_close(layer(x), s * (q(x @ R) - q.bias) + q.bias, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="the base is 4-bit and cannot take BOFT's rotation in place"):
            layer.merge("a")
    assert not layer.merged


def test_cached_generate_equals_uncached_greedy_loop(ckpt):
    model = mc.apply_boft(mc.load_model(ckpt), boft_block_num=4, verbose=False).eval()
    _perturb(model.named_parameters())
    seq = _ids(2, 5, seed=6)
    cached = model.generate(seq, max_new_tokens=15)
    assert torch.equal(cached, greedy_uncached(model, seq, 15))
    with torch.no_grad(), mc.disable_adapters(model):
        assert not torch.equal(model.generate(seq, max_new_tokens=15), cached)


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
    path, hf = make_checkpoint(tmp_path / family, family)
    peft = _peft(hf, **_peft_opts(opts))
    _perturb(peft.named_parameters())
    model = mc.apply_boft(mc.load_model(path), **opts, verbose=False)
    assert {n: p.shape for n, p in _params(model).items()} == {n: p.shape for n, p in _params(peft).items()}
    _copy(peft, model)
    for n, layer in model.named_modules():
        if isinstance(layer, BOFTLinear):
            theirs = peft.get_submodule(PREFIX + n)
            assert torch.equal(layer.permutation_matrices("default"), theirs.boft_P), n
            assert torch.equal(layer.rotation("default"), theirs.get_delta_weight("default")[0]), n
    model.train()
    peft.train()
    ids = _ids()
    out = matches_peft(model, peft, ids, TOL)
    _assert_adapter_matters(model, ids, out)


def test_peft_without_its_cuda_extension_trains_one_butterfly_factor(tmp_path):
    """The docstring's claim: without fbd_cuda, PEFT's boft_R is (1, D, H, H) whatever the factor says."""
    peft = _peft(make_checkpoint(tmp_path, "smollm")[1], boft_block_size=4, boft_n_butterfly_factor=2)
    m = 1 if peft_boft.get_fbd_cuda() is None else 2  # 2 where the extension builds (CUDA_HOME, nvcc, ninja)
    assert {p.shape for n, p in _params(peft).items() if ".boft_R" in n} == {(m, 18, 4, 4)}


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_multiplicative_dropout_is_peft_s_draw_for_draw(tmp_path, fbd, p):
    """Training forwards with boft_dropout: the same global-generator draws as PEFT's (randint, then randperm,
    per module in forward order) give the same blocks set to I, so the logits and gradients match; in eval
    mode nothing is dropped (the forward equals the dropout-free one), nor when merging, and training forwards
    differ."""
    path, hf = make_checkpoint(tmp_path, "qwen3")
    opts = dict(boft_block_size=8, boft_n_butterfly_factor=2, boft_dropout=p,
                targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])  # down_proj: 88 = 11 blocks of 8
    peft = _peft(hf, **_peft_opts(opts))
    _perturb(peft.named_parameters())
    model = mc.apply_boft(mc.load_model(path), **opts, verbose=False)
    _copy(peft, model)
    ids = _ids()
    model.train()
    peft.train()
    torch.manual_seed(5)
    ours = model(ids)
    torch.manual_seed(5)
    theirs = peft(input_ids=ids).logits
    close_to_largest(ours, theirs, TOL, "logits")
    probe = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2))
    (ours * probe).sum().backward()
    (theirs * probe).sum().backward()
    for n, q in _params(peft).items():
        close_to_largest(_params(model)[n].grad, q.grad, TOL, n)
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
        close_to_largest(model.eval()(ids), clean, TOL, "merged")


def test_merging_matches_peft(tmp_path, fbd):
    """merge_and_unload on both sides: the same folded weights (within the parity tolerance)."""
    path, hf = make_checkpoint(tmp_path / "base", "qwen3")
    opts = dict(boft_block_size=4, boft_n_butterfly_factor=2, targets="all-linear")
    peft = _peft(hf, **_peft_opts(opts))
    _perturb(peft.named_parameters())
    model = mc.apply_boft(mc.load_model(path), **opts, verbose=False)
    _copy(peft, model)
    merged, ref = mc.merge_adapter(model), peft.merge_and_unload()
    ours, theirs = dict(merged.named_parameters()), dict(ref.named_parameters())
    assert set(ours) == set(theirs)
    for n in ours:
        close_to_largest(ours[n], theirs[n], TOL, n)


# -- folders ----------------------------------------------------------------------------------------

FOLDERS = {  # family, options on both sides
    "smollm-defaults": ("smollm", dict(targets=None)),
    "qwen3-list": ("qwen3", dict(boft_block_num=4, boft_n_butterfly_factor=2, targets=["k_proj", "down_proj"])),
    "qwen3-regex": ("qwen3", dict(boft_block_size=8, boft_dropout=0.1, targets=r"model\.layers\.1\..*_proj")),
    "smollm-layer": ("smollm", dict(boft_block_size=2, targets=["q_proj", "up_proj"], layers=[1])),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, fbd, case):
    family, opts = FOLDERS[case]
    path, hf = make_checkpoint(tmp_path / "base", family)
    peft = _peft(hf, **_peft_opts(opts))
    _perturb(peft.named_parameters())
    peft.save_pretrained(tmp_path / "adapter")

    model = mc.load_adapter(mc.load_model(path), tmp_path / "adapter").eval()
    peft.eval()
    assert set(_params(model)) == set(_params(peft))
    assert not any(p.requires_grad for p in model.parameters())
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        close_to_largest(out, peft(input_ids=ids).logits, TOL, "logits")
    _assert_adapter_matters(model, ids, out)


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, fbd, case):
    """PeftModel.from_pretrained reads our folder, adapts the same modules and gives our logits; our folder
    loads back here bit for bit, merged or not."""
    family, opts = FOLDERS[case]
    path, hf = make_checkpoint(tmp_path / "base", family)
    model = mc.apply_boft(mc.load_model(path), **opts, verbose=False).eval()
    _perturb(model.named_parameters())
    mc.save_adapter(model, tmp_path / "adapter")

    peft = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert set(_params(peft)) == set(_params(model))
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        close_to_largest(peft(input_ids=ids).logits, out, TOL, "logits")
        assert torch.equal(mc.load_adapter(mc.load_model(path), tmp_path / "adapter").eval()(ids), out)
        mc.merge_adapters(model)
        mc.save_adapter(model, tmp_path / "merged")
        assert torch.equal(mc.load_adapter(mc.load_model(path), tmp_path / "merged").eval()(ids), out)


def test_folder_keys_and_config_are_peft_s(ckpt, tmp_path):
    """The file holds exactly PEFT's keys and shapes, and adapter_config.json every field PEFT writes for
    BOFT (but peft_version, which PEFT stamps itself), with the same values."""
    hf = make_checkpoint(tmp_path / "hf", "smollm")[1]
    _peft(hf, boft_block_size=0, boft_block_num=6, boft_dropout=0.1).save_pretrained(tmp_path / "peft")
    mc.save_adapter(mc.apply_boft(mc.load_model(ckpt), boft_block_num=6, boft_dropout=0.1, verbose=False),
                    tmp_path / "ours")
    ours = load_file(tmp_path / "ours/adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert ours["base_model.model.model.layers.0.self_attn.q_proj.boft_R"].shape == (1, 6, 12, 12)
    c_ours = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    c_theirs = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    c_theirs.pop("peft_version")
    assert set(c_ours) == set(c_theirs)
    for key in c_ours:
        same = sorted if key == "target_modules" else (lambda v: v)
        assert same(c_ours[key]) == same(c_theirs[key]), key


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts, message", [
    (dict(targets=["q_proj", "nope"]), "target 'nope' matches no module"),
    (dict(targets=["input_layernorm"]), "model.layers.0.input_layernorm is a RMSNorm; BOFT targets nn.Linear"),
])
def test_a_target_that_is_not_a_linear_is_one_line_naming_it(ckpt, opts, message):
    model = mc.load_model(ckpt)
    with pytest.raises(ValueError) as e:
        mc.apply_boft(model, **opts)
    assert str(e.value).startswith(f"cannot attach BOFT: {message}") and "\n" not in str(e.value)
    assert "linear modules here are named down_proj, gate_proj, k_proj, lm_head, o_proj" in str(e.value)
    assert _untouched(model)


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
    model = mc.load_model(path)
    with pytest.raises(ValueError) as e:
        mc.apply_boft(model, **opts)
    assert re.match(f"cannot attach BOFT: {message}", str(e.value)) and "\n" not in str(e.value), str(e.value)
    assert _untouched(model)
    with pytest.raises(ValueError):
        _peft(hf, **_peft_opts(opts))


@pytest.mark.parametrize("opts, message", [
    (dict(boft_block_size=4, boft_block_num=8), "exactly one of boft_block_size and boft_block_num"),
    (dict(boft_block_size=0), "exactly one of boft_block_size and boft_block_num"),
    (dict(boft_block_size=-4), "exactly one of boft_block_size and boft_block_num"),
    (dict(boft_n_butterfly_factor=0), "boft_n_butterfly_factor must be a positive integer"),
    (dict(boft_dropout=1.0), r"boft_dropout must be a number in \[0, 1\), found 1.0"),
])
def test_bad_options_are_refused_before_anything_changes(ckpt, opts, message):
    model = mc.load_model(ckpt)
    with pytest.raises(ValueError, match=message) as e:
        mc.apply_boft(model, **opts)
    assert "\n" not in str(e.value) and _untouched(model)


def test_the_registry_entry():
    entry = get_method("boft")
    assert entry.peft_type == "BOFT" and entry.mergeable
    assert entry.defaults() == dict(boft_block_size=None, boft_block_num=0, boft_n_butterfly_factor=1,
                                    boft_dropout=0.0, targets=None)


@pytest.fixture
def saved(ckpt, tmp_path):
    model = mc.apply_boft(mc.load_model(ckpt), verbose=False)
    _perturb(model.named_parameters())
    mc.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_a_folder_that_does_not_fit_is_refused_before_anything_changes(ckpt, saved):
    good = load_file(saved / "adapter_model.safetensors")
    config = json.loads((saved / "adapter_config.json").read_text())
    key = "base_model.model.model.layers.1.self_attn.v_proj.boft_s"
    r_key = "base_model.model.model.layers.0.self_attn.q_proj.boft_R"
    cases = [  # (config, tensors, message)
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
        ({**config, "bias": "boft_only"}, good, r"bias='boft_only' is not supported"),
        ({**config, "exclude_modules": ["v_proj"]}, good, r"exclude_modules=\['v_proj'\] is not supported"),
        ({**config, "modules_to_save": ["lm_head"]}, good, r"modules_to_save=\['lm_head'\] is not supported"),
        ({**config, "layers_pattern": "layers"}, good, r"layers_pattern='layers' is not supported"),
    ]
    for cfg, state, message in cases:
        (saved / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(state, saved / "adapter_model.safetensors")
        model = mc.load_model(ckpt)
        with pytest.raises(mc.AdapterError, match=message):
            mc.load_adapter(model, saved)
        assert _untouched(model), message


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
    ids = _ids(1, 9, seed=4)
    model = mc.load_model(path)
    with torch.no_grad():
        base = model(ids)
        adapted = mc.load_adapter(model, out)(ids)
    assert not torch.equal(adapted, base)  # two steps at lr 1e-2 moved boft_R and boft_s
    main(["merge", "--model", str(path), "--adapter", str(out), "--out", str(tmp_path / "merged")])
    with torch.no_grad():
        close_to_largest(mc.load_model(tmp_path / "merged")(ids), adapted, TOL, "merged checkpoint")
