"""LoRA against PEFT (the test-only oracle): same weights give the same logits and gradients, and
adapter folders travel both ways (minicustom -> PEFT, PEFT -> minicustom).

Weights are made identical by name: PEFT's in-memory name minus "base_model.model." and ".base_layer"
is ours ("lora_magnitude_vector.<name>.weight" is our "lora_magnitude_vector.<name>"). Every lora_B is
drawn non-zero (std 0.1, and A std 0.1), so the LoRA branch moves the logits by O(1) and a wrong
scaling, a transposed factor or a dropped module shows far above round-off; DoRA magnitudes are
scaled by 1 + 0.2·N(0, 1) so that m ≠ ||W0 + s B A|| and the magnitude path carries weight.

Tolerances (fp32; eps = 1.2e-7, one ulp of the largest logit |y| ~ 7 is 4.8e-7). The base model is
bitwise equal to transformers' (the forward of tests/test_model.py agrees to 0.0 on these checkpoints),
and plain LoRA / rsLoRA evaluate the same expression, W0 x + b + B(A x)·s, in the same order, so they
agree exactly (measured: 0.0). DoRA differs in evaluation order only: PEFT forms B A as B(A I)^T
(another matmul blocking, so the row norms n = ||W0 + s B A|| move by ~1 ulp) and sums
y + [(m/n - 1) W0 x + (m/n)(B A x) s] where we sum [y + (m/n - 1) W0 x] + (m/n)(s B A x): a couple of
ulps of |y| per adapted linear. RMSNorm keeps them from growing, so 14 adapted linears leave
≲ 14 · 2 ulps ≈ 1.3e-5 at the largest logit in the worst (aligned) case; measured 4e-6 .. 7.2e-6
over all six families. Hence atol 1e-5 with rtol 1e-6 (≈ 1.7e-5 at |y| = 7). Gradients of A, B and
m reach |g| ~ 200 (sums over B·T = 34 positions), where one ulp is already 1.5e-5, so an absolute
1e-5 cannot hold for any reordering; they carry the same ~14 · 2-ulp relative error, measured
≤ 3.9e-6 of max |g|. They are compared divided by their largest entry, with atol 1e-5: the same
bound on the gradient's own scale.

Folders: saving and loading copy tensors bit for bit, so a round trip adds no error and the same
1e-5 applies. PiSSA/OLoRA and merging rewrite base weights (W0 - s B0 A0, W0 + s B A); see the
tests' docstrings.
"""

import pytest
import torch
from conftest import make_checkpoint, make_hf_model, token_ids
from peft import LoraConfig, PeftModel, get_peft_model

import minicustom as mc
from minicustom.methods.lora_layers import LoRAEmbedding, LoRALinear

ATOL, RTOL = 1e-5, 1e-6  # logits
GATOL = 1e-5  # gradients, divided by their largest entry


_ids = token_ids


def _ours(peft_name: str) -> str:
    """PEFT's in-memory parameter or module name -> minicustom's."""
    name = peft_name.removeprefix("base_model.model.").replace(".base_layer", "")
    if ".lora_magnitude_vector." in name:
        name = name.removesuffix(".weight")
    return name


def _adapter_params(named_params):
    """The adapter tensors (trainable or not) of a model: LoRA factors, magnitudes, saved copies."""
    keys = ("lora_", "modules_to_save.")
    return {n: p for n, p in named_params if any(k in n for k in keys)}


@torch.no_grad()
def _perturb(named_params, seed=0):
    """A, B := 0.1·N(0, 1); DoRA m *= 1 + 0.2·N(0, 1); saved copies += 0.05·N(0, 1). In name order,
    so two models with the same names get the same values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(_adapter_params(named_params).items()):
        noise = torch.randn(p.shape, generator=g)
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.2 * noise)
        elif "modules_to_save." in name:
            p.add_(0.05 * noise)
        else:
            p.copy_(0.1 * noise)


@torch.no_grad()
def _copy_peft_into(model, peft):
    """Copy every adapter tensor of `peft` into minicustom's `model`; the two sets of names must agree."""
    theirs = {_ours(n): p for n, p in _adapter_params(peft.named_parameters()).items()}
    ours = _adapter_params(model.named_parameters())
    assert set(ours) == set(theirs)
    for name, p in ours.items():
        p.copy_(theirs[name])


def _lora_layers(model, adapter="default") -> dict[str, tuple[int, float]]:
    """{module name: (r, scaling)} of every LoRA layer holding `adapter`, PEFT's mapped to our names."""
    out = {}
    for name, m in model.named_modules():
        scaling = getattr(m, "scaling", None)
        if isinstance(scaling, dict) and adapter in scaling:
            A = m.lora_A[adapter].weight if adapter in getattr(m, "lora_A", {}) else m.lora_embedding_A[adapter]
            out[_ours(name)] = (A.shape[0], scaling[adapter])
    return out


def _assert_adapter_matters(model, ids, out):
    """Guard against a vacuous match: the adapter moves our logits far beyond the tolerances."""
    with torch.no_grad(), mc.disable_adapters(model):
        assert (out - model(ids)).abs().max() > 0.1


def _peft(hf, adapter_name="default", **kw):
    return get_peft_model(hf, LoraConfig(task_type="CAUSAL_LM", **kw), adapter_name=adapter_name)


ALL = dict(targets="all-linear")
EMB = dict(targets=["embed_tokens", "q_proj", "down_proj"])
VARIANTS = {  # our apply_lora keywords; PEFT's are the same but targets -> target_modules
    "lora": ALL, "rslora": dict(ALL, use_rslora=True), "dora": dict(ALL, use_dora=True), "embedding": EMB,
}


def _peft_kw(kw):
    kw = dict(kw)
    kw["target_modules"] = kw.pop("targets")
    return kw


# -- 1. same weights, same logits and gradients ----------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", ["llama-bias", "qwen3", "smollm"])
def test_logits_and_gradients_match_peft(tmp_path, family, variant):
    """LoRA / rsLoRA / DoRA on all-linear, and LoRA on the embedding (tied to lm_head in smollm) plus
    two linears; dropout 0, train mode: logits and the gradient of every trainable tensor (lora_A,
    lora_B, DoRA magnitude, lora_embedding_A/B) equal PEFT's, and the trainable sets agree."""
    path, hf = make_checkpoint(tmp_path / family, family)
    peft = _peft(hf, r=8, lora_alpha=16, lora_dropout=0.0, **_peft_kw(VARIANTS[variant]))
    _perturb(peft.named_parameters())
    model = mc.load_model(path)
    mc.apply_lora(model, r=8, alpha=16, dropout=0.0, verbose=False, **VARIANTS[variant])
    _copy_peft_into(model, peft)
    assert _lora_layers(model) == _lora_layers(peft)
    model.train()
    peft.train()

    ids = _ids()
    probe = torch.randn(2, 17, 131, generator=torch.Generator().manual_seed(2))
    out, ref = model(ids), peft(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    _assert_adapter_matters(model, ids, out)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()

    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {_ours(n): p for n, p in peft.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    assert len(ours) == {"dora": 3 * 14, "embedding": 2 * 5}.get(variant, 2 * 14)
    for name in ours:
        scale = theirs[name].grad.abs().max()  # gradients reach ~200: the bound is relative to that
        torch.testing.assert_close(ours[name].grad / scale, theirs[name].grad / scale, atol=GATOL, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_embedding_lora_gradient_skips_padding_row_as_peft(tmp_path):
    """HF builds embed_tokens with padding_idx = pad_token_id (0 here), and PEFT looks the LoRA factor A
    up with the same padding_idx, so A's column for the pad token gets no gradient (F.embedding). With
    pad tokens in the input, the forward is unchanged but that column's gradient must be zero too."""
    path, hf = make_checkpoint(tmp_path / "base", "llama3")
    assert hf.get_input_embeddings().padding_idx == 0
    peft = _peft(hf, r=4, lora_alpha=8, **_peft_kw(EMB))
    _perturb(peft.named_parameters())
    model = mc.load_model(path)
    mc.apply_lora(model, r=4, alpha=8, verbose=False, **EMB)
    _copy_peft_into(model, peft)
    ids = _ids()
    ids[:, ::5] = 0
    out, ref = model(ids), peft(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    out.sum().backward()
    ref.sum().backward()
    A = model.model.embed_tokens.lora_embedding_A["default"]
    assert torch.count_nonzero(peft.base_model.model.model.embed_tokens.lora_embedding_A["default"].grad[:, 0]) == 0
    assert torch.count_nonzero(A.grad[:, 0]) == 0, "lora_embedding_A's pad-token column received a gradient"


# -- 2. minicustom saves, PEFT loads ---------------------------------------------------------------

SAVE_CASES = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "dora-dropout": {"use_dora": True, "dropout": 0.1},  # compared in eval mode: dropout is the identity
    "layers": {"layers": [1]},
    "regex": {"targets": r"model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.down_proj)"},
    "patterns": {"rank_pattern": {"q_proj": 4, "model.layers.1.mlp.down_proj": 12},
                 "alpha_pattern": {"v_proj": 4, "layers.0.mlp.up_proj": 40}},
    "embedding": {"targets": ["embed_tokens", "v_proj"]},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, case):
    """PeftModel.from_pretrained on a copy of the HF base reads our folder, adapts the same modules with
    the same ranks and scalings (a saved lm_head copy: the same weights), and gives our logits."""
    path, hf = make_checkpoint(tmp_path / "base", "qwen3")
    model = mc.load_model(path)
    mc.apply_lora(model, r=8, alpha=16, verbose=False, **SAVE_CASES[case])
    _perturb(model.named_parameters())
    mc.save_adapter(model, tmp_path / "adapter")

    peft = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    model.eval()
    assert _lora_layers(peft) == _lora_layers(model)
    if case == "modules_to_save":
        torch.testing.assert_close(peft.base_model.model.lm_head.modules_to_save["default"].weight,
                                   model.lm_head.modules_to_save["default"].weight, atol=0, rtol=0)
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(out, peft(input_ids=ids).logits, atol=ATOL, rtol=RTOL)
    _assert_adapter_matters(model, ids, out)


# -- 3. PEFT saves, minicustom loads ---------------------------------------------------------------

PATTERNS = {"rank_pattern": {"q_proj": 4, "model.layers.1.mlp.down_proj": 12},
            "alpha_pattern": {"v_proj": 4, "layers.0.mlp.up_proj": 40}}
LOAD_CASES = {
    "patterns": ("llama3", {"target_modules": "all-linear", **PATTERNS}),
    "rslora": ("llama3", {"target_modules": "all-linear", "use_rslora": True, **PATTERNS}),
    "dora": ("llama-bias", {"target_modules": "all-linear", "use_dora": True}),
    "dora-layers": ("qwen3", {"target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"], "use_dora": True,
                              "layers_to_transform": [0], "layers_pattern": "layers", "lora_dropout": 0.1,
                              "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
    "embedding": ("llama3", {"target_modules": ["embed_tokens", "q_proj", "v_proj"]}),
    "embedding-tied": ("smollm", {"target_modules": ["embed_tokens", "q_proj", "v_proj"]}),
    "modules_to_save": ("qwen3", {"target_modules": "all-linear", "modules_to_save": ["lm_head"]}),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, case):
    """mc.load_adapter reads PEFT's folder (per-module ranks and alphas from rank_pattern/alpha_pattern,
    layers_to_transform, DoRA magnitudes, rsLoRA, LoRA on the embedding, tied or not, a saved lm_head
    copy) into the same modules with the same ranks and scalings, and gives PEFT's logits."""
    family, kw = LOAD_CASES[case]
    path, hf = make_checkpoint(tmp_path / "base", family)
    peft = _peft(hf, r=8, lora_alpha=16, **kw)
    _perturb(peft.named_parameters())
    peft.save_pretrained(tmp_path / "adapter")

    model = mc.load_adapter(mc.load_model(path), tmp_path / "adapter").eval()
    peft.eval()
    assert _lora_layers(model) == _lora_layers(peft)
    if "rank_pattern" in kw:
        assert {r for r, _ in _lora_layers(model).values()} == {*kw["rank_pattern"].values(), 8}
    if case.startswith("embedding"):
        assert isinstance(model.model.embed_tokens, LoRAEmbedding)
    if case == "embedding-tied":  # the LoRA goes on the input lookup only; lm_head keeps the base matrix
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if case == "modules_to_save":
        torch.testing.assert_close(model.lm_head.modules_to_save["default"].weight,
                                   peft.base_model.model.lm_head.modules_to_save["default"].weight, atol=0, rtol=0)
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(out, peft(input_ids=ids).logits, atol=ATOL, rtol=RTOL)
    _assert_adapter_matters(model, ids, out)


# -- 4. PiSSA and OLoRA ----------------------------------------------------------------------------

INIT_CASES = {
    "pissa": ("pissa", {}),
    "pissa-rslora": ("pissa", {"use_rslora": True}),
    "olora": ("olora", {}),
    "olora-patterns": ("olora", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
}


@pytest.mark.parametrize("case", list(INIT_CASES))
def test_pissa_olora_init_matches_peft(tmp_path, case):
    """A, B and the residual W0 - s B A equal PEFT's bit for bit; the model is unchanged at init; after
    training-like changes to A and B, our saved folder (PEFT's rank-2r conversion for the original base,
    alpha ×2, or ×√2 with rsLoRA) loaded by PEFT onto a fresh, unmodified HF model gives our logits;
    and PEFT's own conversion of its PiSSA/OLoRA adapter, loaded by us on an unmodified base, gives
    PEFT's logits.

    Exactness of the factors: both sides call the same LAPACK routine (torch.linalg.svd / qr) on the
    same fp32 matrix in the same process and then evaluate the same expressions (√(S_r / s), U_r, V_r;
    Q_r, R_r; W0 - (s B) A), so the results are identical bits; a sign-convention difference would
    show as an O(1) error. Identity at init: W_res + s B A equals W0 only to round-off, a few ulps of
    the largest of |W0|, |s B A| (~1) per entry, i.e. a relative change of a few eps per linear, the
    same budget as DoRA's above but without its partial cancellation: ≲ 14 · 4 ulps of |y| ~ 7, 2.7e-5,
    so 1e-4. The converted folders put s B A - s B0 A0 on top of the original W0, which equals
    W_res + s B A to the same round-off: 1e-4 as well (measured ≤ 1.9e-5 in all three comparisons).
    """
    init, kw = INIT_CASES[case]
    path, hf = make_checkpoint(tmp_path / "base", "llama-bias")
    base = mc.load_model(path).eval()
    model = mc.load_model(path).eval()
    mc.apply_lora(model, r=4, alpha=8, init=init, verbose=False, **kw)
    peft = _peft(hf, r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init, **kw).eval()

    assert _lora_layers(model) == _lora_layers(peft)
    theirs = dict(peft.named_parameters())
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 14
    for name, layer in layers:
        prefix = f"base_model.model.{name}."
        for ours, key in [(layer.lora_A["default"].weight, "lora_A.default.weight"),
                          (layer.lora_B["default"].weight, "lora_B.default.weight"),
                          (layer.weight, "base_layer.weight")]:
            torch.testing.assert_close(ours, theirs[prefix + key], atol=0, rtol=0, msg=f"{name}.{key}")

    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids), atol=1e-4, rtol=0)

    # ours -> PEFT
    _perturb(model.named_parameters(), seed=3)
    mc.save_adapter(model, tmp_path / "ours")
    fresh = PeftModel.from_pretrained(make_hf_model("llama-bias"), tmp_path / "ours").eval()
    ours_rs, theirs_rs = _lora_layers(model), _lora_layers(fresh)
    assert set(ours_rs) == set(theirs_rs)
    for name, (r, s) in ours_rs.items():  # rank 2r, same scaling (alpha ×2, or ×√2 under rsLoRA)
        assert theirs_rs[name] == (2 * r, pytest.approx(s, rel=1e-12)), name
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(fresh(input_ids=ids).logits, out, atol=1e-4, rtol=0)
        assert (out - base(ids)).abs().max() > 0.1

    # PEFT -> ours. (PEFT doubles alpha_pattern also under rsLoRA, where √2 keeps the scaling; no
    # alpha_pattern is combined with rsLoRA here.)
    peft.save_pretrained(tmp_path / "peft-init")
    _perturb(peft.named_parameters(), seed=3)
    peft.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=tmp_path / "peft-init")
    loaded = mc.load_adapter(mc.load_model(path), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), peft(input_ids=ids).logits, atol=1e-4, rtol=0)


# -- 5. weighted combinations ----------------------------------------------------------------------

def _two_adapters(tmp_path, ranks, targets="all-linear", family="llama-bias"):
    """PEFT and minicustom models with the same two adapters, "default" (alpha 8) and "b" (alpha 20)."""
    path, hf = make_checkpoint(tmp_path / "base", family)
    (ra, rb), (alpha_a, alpha_b) = ranks, (8, 20)
    peft = _peft(hf, r=ra, lora_alpha=alpha_a, target_modules=targets)
    peft.add_adapter("b", LoraConfig(task_type="CAUSAL_LM", r=rb, lora_alpha=alpha_b, target_modules=targets))
    _perturb(peft.named_parameters())
    model = mc.load_model(path)
    mc.apply_lora(model, r=ra, alpha=alpha_a, targets=targets, verbose=False)
    mc.apply_lora(model, r=rb, alpha=alpha_b, targets=targets, adapter_name="b", verbose=False)
    _copy_peft_into(model, peft)
    return model, peft


@pytest.mark.parametrize("combination,ranks", [("cat", (4, 6)), ("linear", (4, 4))])
def test_add_weighted_adapter_matches_peft(tmp_path, combination, ranks):
    """Two adapters (different alphas; different ranks for "cat") combined with weights [0.7, -0.4]:
    the new adapter's factors and the logits with it active equal PEFT's add_weighted_adapter.
    PEFT scales A by w then s, we by (w s): 1 ulp on the factors (1e-6 at |A| ≲ 1), and logits within
    the budget above (measured 5.9e-6)."""
    model, peft = _two_adapters(tmp_path, ranks)
    peft.add_weighted_adapter(["default", "b"], [0.7, -0.4], "ab", combination_type=combination)
    peft.set_adapter("ab")
    mc.add_weighted_adapter(model, ["default", "b"], [0.7, -0.4], "ab", combination=combination)
    mc.set_adapter(model, "ab")
    assert _lora_layers(model, "ab") == _lora_layers(peft, "ab")
    theirs = dict(peft.named_parameters())
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            for f in ("lora_A", "lora_B"):
                torch.testing.assert_close(getattr(layer, f)["ab"].weight,
                                           theirs[f"base_model.model.{name}.{f}.ab.weight"],
                                           atol=1e-6, rtol=1e-6, msg=f"{name}.{f}")
    ids = _ids()
    peft.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), peft(input_ids=ids).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("combination", ["cat", "linear"])
def test_add_weighted_adapter_with_embedding_lora_matches_peft(tmp_path, combination):
    """Adapters that include LoRA on embed_tokens: PEFT combines the embedding factors too (same rule as
    for linears), so the combined adapter must act on the embedding as well."""
    model, peft = _two_adapters(tmp_path, (4, 4), targets=["embed_tokens", "q_proj"], family="llama3")
    peft.add_weighted_adapter(["default", "b"], [0.7, -0.4], "ab", combination_type=combination)
    peft.set_adapter("ab")
    mc.add_weighted_adapter(model, ["default", "b"], [0.7, -0.4], "ab", combination=combination)
    mc.set_adapter(model, "ab")
    assert _lora_layers(model, "ab") == _lora_layers(peft, "ab")
    ids = _ids()
    peft.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), peft(input_ids=ids).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("first", [{"layers": [1]}, {"targets": r".*\.q_proj"}])
def test_weighted_adapter_saved_by_minicustom_loads_in_peft(tmp_path, first):
    """A combined adapter lives on the union of its parts' modules; its folder must say so. The first
    part here covers fewer modules (one layer, or q_proj only) than the second (all-linear)."""
    path, hf = make_checkpoint(tmp_path / "base", "llama3")
    model = mc.load_model(path)
    mc.apply_lora(model, r=4, alpha=8, verbose=False, **first)
    mc.apply_lora(model, r=4, alpha=12, adapter_name="b", verbose=False)
    _perturb(model.named_parameters())
    mc.add_weighted_adapter(model, ["default", "b"], [0.7, -0.4], "ab", combination="cat")
    mc.set_adapter(model, "ab")
    mc.save_adapter(model, tmp_path / "adapter", adapter_name="ab")

    peft = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert _lora_layers(peft) == _lora_layers(model.eval(), "ab")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), peft(input_ids=ids).logits, atol=ATOL, rtol=RTOL)


# -- 6. merge and unload ---------------------------------------------------------------------------

MERGE_CASES = {
    "lora": ALL, "dora": dict(ALL, use_dora=True),
    "embedding-modules_to_save": dict(targets=["embed_tokens", "o_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_adapter_matches_peft_merge_and_unload(tmp_path, case):
    """mc.merge_adapter and PEFT's merge_and_unload give plain models (no adapter layer left; a saved
    lm_head copy replaces lm_head) with the same parameters under the same names and the same logits.
    Both fold W0 + s B A (DoRA: (m / ||W0 + s B A||)(W0 + s B A)) in fp32; any reordering costs a few
    ulps of |W| ≲ 1 per entry, so 1e-6 on weights (measured 0.0), and the logits follow within the
    budget above (measured 0.0)."""
    path, hf = make_checkpoint(tmp_path / "base", "llama-bias")
    kw = dict(MERGE_CASES[case])
    peft = _peft(hf, r=8, lora_alpha=16, **_peft_kw(kw))
    _perturb(peft.named_parameters())
    model = mc.load_model(path)
    mc.apply_lora(model, r=8, alpha=16, verbose=False, **kw)
    _copy_peft_into(model, peft)

    merged = mc.merge_adapter(model).eval()
    ref = peft.merge_and_unload().eval()
    assert {type(m) for m in merged.modules()} == {type(m) for m in mc.load_model(path).modules()}
    ours, theirs = dict(merged.named_parameters()), dict(ref.named_parameters())
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-6, msg=name)
    ids = _ids()
    with torch.no_grad():
        out = merged(ids)
        torch.testing.assert_close(out, ref(input_ids=ids).logits, atol=ATOL, rtol=RTOL)
        assert (out - mc.load_model(path)(ids)).abs().max() > 0.1


# -- 5. the families beyond Llama's -----------------------------------------------------------------

@pytest.mark.parametrize("family", ["gemma3", "gemma2", "phi3", "phi4mini"])
def test_new_families_match_peft_and_files_travel_both_ways(tmp_path, family):
    """LoRA on every linear of Gemma 2/3 (scaled embeddings, sandwich norms, caps) and of Phi-3's fused qkv_proj
    and gate_up_proj, which PEFT treats as ordinary linears: same weights, PEFT's logits and gradients; our
    folder loads in PEFT and PEFT's in ours with the same logits. Tolerances as in the module docstring."""
    path, hf = make_checkpoint(tmp_path / family, family)
    peft = _peft(hf, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    _perturb(peft.named_parameters())
    model = mc.load_model(path)
    mc.apply_lora(model, r=8, alpha=16, dropout=0.0, verbose=False, targets="all-linear")
    _copy_peft_into(model, peft)
    linears = {n for n, _ in _lora_layers(model).items()}
    assert _lora_layers(model) == _lora_layers(peft)
    if family.startswith("phi"):
        assert {n.rsplit(".", 1)[-1] for n in linears} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    model.train()
    peft.train()
    ids = _ids()
    out, ref = model(ids), peft(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    _assert_adapter_matters(model, ids, out)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    theirs = {_ours(n): p for n, p in peft.named_parameters() if p.requires_grad}
    for name, p in ((n, p) for n, p in model.named_parameters() if p.requires_grad):
        scale = theirs[name].grad.abs().max()
        torch.testing.assert_close(p.grad / scale, theirs[name].grad / scale, atol=GATOL, rtol=0, msg=name)

    model.eval()
    mc.save_adapter(model, tmp_path / "ours")
    peft.save_pretrained(tmp_path / "theirs")
    _, fresh_hf = make_checkpoint(tmp_path / "again", family)
    in_peft = PeftModel.from_pretrained(fresh_hf, tmp_path / "ours").eval()
    in_ours = mc.load_adapter(mc.load_model(path), tmp_path / "theirs").eval()
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(in_peft(input_ids=ids).logits, expected, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(in_ours(ids), peft.eval()(input_ids=ids).logits, atol=ATOL, rtol=RTOL)
