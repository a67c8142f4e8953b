"""AdaLoRA: invariants, the formula, PEFT parity (logits, gradients, the regularizer, the rank allocation, merging,
folders both ways, pruned ones included), the trainer's hooks (resume, the command line) and errors.

Factors are set to N(0, 0.3²) (in name order, so two models with the same names get the same values): with
init_r = 12, an entry of B (A ⊙ E) is ~0.3³·√12 ≈ 0.09 and of ΔW (× alpha / init_r = 8/12) ~0.06, against
tiny-model weights of ~0.02, so the logits move by O(1) (checked), and a factor swapped, transposed or scaled
wrongly shows far above round-off.

Exactness and tolerances (fp32, eps = 1.2e-7):
- Identity at init and disabled adapters: E = 0 makes A ⊙ E = 0 and the update exactly 0, and y + 0 = y; with no
  active adapter the forward is the base linear alone. Zero tolerance (torch.equal). The init draws are PEFT's
  (randn A, E, B, ranknum, then N(0, 0.02²) A and B): one seed gives PEFT's tensors bit for bit (torch.equal).
- PEFT parity: both sides compute W0 x + b + ((x (A ⊙ E)ᵀ) Bᵀ)·alpha/(ranknum + 1e-5) with the same operations
  in the same order on the same tensors; only the model around them (attention, norms) is ours against
  transformers': a few ulps per op, compounded over 2 layers, about 1e-6 of the largest entry. Logits and every
  trainable gradient are compared after dividing by the reference's largest entry, atol 1e-5, rtol 0: ten times
  that bound, five orders below the adapter's own effect. Measured: logits and gradients 0.0 apart on every
  parity case; the loss with the orthogonality regularizer 0.0 apart, its gradients 0.0 apart.
- The rank allocation repeats PEFT's arithmetic op for op (|p ⊙ g|, the two EMAs, the means, kthvalue) on the
  same tensors, so budgets, masks, rank patterns and EMAs are compared exactly (==, torch.equal).
- Merging: W0 + ΔW rounds once per entry (≤ ulp(|W0| + |ΔW|)/2 ≈ 6e-8 relative), then one matmul replaces two:
  the parity tolerance (1e-5 of the largest logit) holds. Measured: 2.4e-6 of the largest logit. Unmerging
  subtracts the same ΔW: W0 comes back within one rounding of |W0| + |ΔW|, so atol = 2·eps·max(|W0| + |ΔW|).
- Folders: saving and loading copy the factors bit for bit, so minicustom -> minicustom is exact and PEFT <->
  minicustom keeps the parity tolerance. A pruned adapter is saved without its dropped triplets (whose E is 0):
  the reloaded layer sums fewer exact zeros, in another blocking of the matmuls, so its logits equal the
  unpruned ones within the parity tolerance (measured: 1.5e-7 and 7.9e-7 of the largest logit, the same
  for PEFT's forward on our pruned folders).
"""

import json
import shutil

import peft_parity as pp
import pytest
import torch
from conftest import make_checkpoint, token_ids
from peft import AdaLoraConfig, PeftModel
from safetensors.torch import load_file
from test_cli_errors import fails

import minicustom as mc
from minicustom.cli import main
from minicustom.data import load_examples
from minicustom.methods import adapter_configs, apply_method, get_method
from minicustom.methods.adalora import FACTORS, AdaLoraLinear
from minicustom.train import TrainConfig, train

# Every factor := N(0, 0.3²); PEFT's configs need a total_step, these tests' is 10.
ADALORA = pp.Method("AdaLoRA", "adalora", mc.apply_adalora, AdaLoraConfig, AdaLoraLinear,
                    tuple(f".{f}." for f in FACTORS), pp.normal(0.3),
                    to_peft=pp.renamed(alpha="lora_alpha", delta_t="deltaT"), peft_defaults=dict(total_step=10))


# -- invariants and the formula --------------------------------------------------------------------

def test_identity_at_init_is_exact_and_the_draws_are_peft_s(tmp_path):
    path, hf = make_checkpoint(tmp_path / "base", "smollm")
    torch.manual_seed(3)
    model = pp.exact_at_init(ADALORA, path)
    torch.manual_seed(3)
    peft = ADALORA.peft(hf)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, AdaLoraLinear) and not layer.lora_E["default"].any()
    assert all(ADALORA.params(model)[n].equal(p) for n, p in ADALORA.params(peft).items())  # drawn as PEFT draws


def test_formula_by_hand():
    """y = W0 x + b + Σ_active B (A ⊙ E) x · alpha / (ranknum + 1e-5); none active: the base linear."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(13, 7)
    layer = AdaLoraLinear(lin)
    layer.add("a", 3, 5.0)
    layer.add("b", 2, 0.5, init_weights=False, ranknum=4)  # a pruned layer keeps dividing by its first rank
    ADALORA.perturb(layer.named_parameters())
    x = torch.randn(4, 5, 13)

    def dw(n, alpha, ranknum):
        p = layer.adapter_state(n)
        return p["lora_B"] @ (p["lora_A"] * p["lora_E"]) * alpha / (ranknum + 1e-5)

    layer.active = ["a", "b"]
    expected = x @ (lin.weight + dw("a", 5.0, 3) + dw("b", 0.5, 4)).T + lin.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.active = []
    assert torch.equal(layer(x), lin(x))


@pytest.mark.parametrize("family", ["smollm", "qwen3"])
def test_only_the_factors_are_trainable(tmp_path, capsys, family):
    """PEFT's default targets for both families: q_proj and v_proj in each of the 2 layers, three factors each."""
    path, _ = make_checkpoint(tmp_path, family)
    model = mc.apply_adalora(mc.load_model(path), init_r=4, target_r=2)
    expected = {}
    for i in range(model.config.num_hidden_layers):
        for m in ("q_proj", "v_proj"):
            lin = model.model.layers[i].self_attn.get_submodule(m)
            for f, shape in zip(FACTORS, [(4, lin.in_features), (4, 1), (lin.out_features, 4)]):
                expected[f"model.layers.{i}.self_attn.{m}.{f}.default"] = shape
    n, total = pp.trainable_shapes(model, expected)
    assert f"AdaLoRA 'default': 4 modules, init_r=4, target_r=2, alpha=8, trainable parameters {n:,} of {total:,}" \
        in capsys.readouterr().out


def test_base_bit_identical_after_an_adamw_step(ckpt):
    pp.adamw_moves_every_trainable(mc.apply_adalora(mc.load_model(ckpt), verbose=False))


def test_disable_adapters_is_exactly_the_base(ckpt):
    pp.disabling_gives_the_base(ADALORA, ckpt)


def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w0(ckpt):
    pp.merge_unmerge_unload(ADALORA, ckpt, pp.additive_restore_atol, targets="all-linear")


def test_on_a_4bit_base_the_adapter_runs_and_merging_is_refused():
    pp.on_a_4bit_base(AdaLoraLinear, lambda layer: layer.add("a", 2, 1.0, init_weights=False), pp.adds_delta_w,
                      "AdaLoRA's ΔW")


def test_cached_generate_equals_uncached_greedy_loop(ckpt):
    pp.generates_as_uncached(ADALORA, ckpt)


# -- PEFT parity ------------------------------------------------------------------------------------

PARITY = {  # family, options on both sides (None targets: PEFT's default for the family)
    "smollm": ("smollm", dict(init_r=12, alpha=8, targets=None)),
    "qwen3-all-linear": ("qwen3", dict(init_r=5, alpha=3, targets="all-linear")),
    "smollm-mlp": ("smollm", dict(init_r=4, alpha=16, targets=["gate_proj", "down_proj"])),
}


def _twins(tmp_path, family, **opts):
    """(folder, ours, PEFT's): the same options (target_r = 2, total_step = 10, and `opts`) and the same perturbed
    factors."""
    return pp.twins(ADALORA, tmp_path, family, target_r=2, total_step=10, **opts)


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_and_gradients_match_peft(tmp_path, case):
    family, opts = PARITY[case]
    _, model, peft = _twins(tmp_path, family, **opts)
    pp.trains_as_peft(ADALORA, model, peft)


def test_orthogonality_regularizer_is_what_peft_adds_to_the_loss(tmp_path):
    """PEFT's loss with labels is CE + orth_reg_weight · mean ‖A Aᵀ − I‖_F, ‖Bᵀ B − I‖_F: ours is the same CE
    plus the hook's regularizer, in value and in every gradient."""
    _, model, peft = _twins(tmp_path, "smollm", init_r=6, orth_reg_weight=0.7)
    model.train()
    peft.train()
    ids = token_ids()
    hook = adapter_configs(model)["default"].training_hooks(model, "default", 10)
    reg = hook.regularizer()
    logits = model(ids)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    ours = ce + reg
    theirs = peft(input_ids=ids, labels=ids).loss
    assert reg > 0.1 * ce
    pp.close(ours.detach(), theirs.detach(), "loss")
    ours.backward()
    theirs.backward()
    for n, p in ADALORA.params(model).items():
        pp.close(p.grad, ADALORA.params(peft)[n].grad, n)


KEPT = {1: 16, 2: 16, 3: 16, 4: 10, 5: 10, 6: 8, 7: 8, 8: 8, 9: 8, 10: 8, 11: 8, 12: 8}


def test_rank_allocation_matches_peft_s_rank_allocator(tmp_path):
    """The same gradients and updates on both sides, then AdaLoraModel.update_and_allocate(t) against our hook's
    after_step(t), t = 1 .. 12 (total_step 10: warm-up to 2, the cubic budget every 2nd step, the final mask at 8,
    then the fixed mask): equal budgets, masks, rank patterns and importance averages at every step."""
    _, model, peft = _twins(tmp_path, "smollm", init_r=4, tinit=2, tfinal=2, delta_t=2)
    config = adapter_configs(model)["default"]
    hook = config.training_hooks(model, "default", 99)  # total_step 10 was given: it stands
    theirs_alloc = peft.base_model.rankallocator
    assert config.total_step == 10 and hook.init_bgt == theirs_alloc.init_bgt == 16 and hook.target_bgt == 8
    budgets = [hook.budget_schedule(t) for t in range(13)]
    assert budgets == [theirs_alloc.budget_schedule(t) for t in range(13)]
    assert budgets[2] == (16, False) and budgets[3] == (int(8 * (1 - 1 / 6) ** 3 + 8), False)
    assert budgets[4] == (int(8 * (1 - 2 / 6) ** 3 + 8), True) and budgets[8] == (8, True)
    g = torch.Generator().manual_seed(5)
    for t in range(1, 13):
        ours, theirs = ADALORA.params(model), ADALORA.params(peft)
        with torch.no_grad():
            for n in sorted(ours):
                grad = torch.randn(ours[n].shape, generator=g)
                ours[n].grad, theirs[n].grad = grad.clone(), grad.clone()
                ours[n].sub_(0.05 * grad)
                theirs[n].sub_(0.05 * grad)
        hook.after_step(t)
        peft.base_model.update_and_allocate(t)
        assert all(torch.equal(p, theirs[n]) for n, p in ours.items()), t
        pattern = {k.replace(".default", ""): v for k, v in (peft.peft_config["default"].rank_pattern or {}).items()}
        assert (config.rank_pattern or {}) == pattern, t
        for key, avg in hook.exp_avg_ipt.items():  # PEFT's keys: the parameter's name, with the adapter's
            assert torch.equal(avg, theirs_alloc.exp_avg_ipt[key + ".default"]), (t, key)
            assert torch.equal(hook.exp_avg_unc[key], theirs_alloc.exp_avg_unc[key + ".default"]), (t, key)
        assert len(hook.exp_avg_ipt) == len(theirs_alloc.exp_avg_ipt) == (12 if t < 8 else 0)  # reset at 8
        kept = sum(map(sum, config.rank_pattern.values())) if config.rank_pattern else 16
        assert kept == KEPT[t], t  # masks at 4 (budget 10), 6 (8), 8 (the final 8), then the same mask
        zeros = sum(int((layer.lora_E["default"] == 0).sum()) for layer in model.modules()
                    if isinstance(layer, AdaLoraLinear))
        assert zeros == 16 - kept if t in (4, 6, 8, 9, 10, 11, 12) else zeros == 0, t  # a masked E regrows by a step


def test_merging_matches_peft(tmp_path):
    _, model, peft = _twins(tmp_path, "qwen3")
    pp.merged_as_peft(model, peft)


# -- folders ----------------------------------------------------------------------------------------

FOLDERS = {  # family, options on both sides, steps of rank allocation before saving (0: full rank)
    "smollm-defaults": ("smollm", dict(targets=None), 0),
    "qwen3-list-pruned": ("qwen3", dict(init_r=4, alpha=2, targets=["k_proj", "down_proj"]), 9),
    "smollm-layer-pruned": ("smollm", dict(init_r=3, alpha=3, targets=["q_proj", "up_proj"], layers=[1]), 5),
}


def _allocate(params, steps, allocate):
    """`steps` steps of seeded gradients and updates, each followed by allocate(t)."""
    g = torch.Generator().manual_seed(7)
    for t in range(1, steps + 1):
        with torch.no_grad():
            for _, p in sorted((n.removeprefix(pp.PREFIX), p) for n, p in params() if p.requires_grad):
                p.grad = torch.randn(p.shape, generator=g)
                p.sub_(0.05 * p.grad)
        allocate(t)


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, case):
    family, opts, steps = FOLDERS[case]
    model, _, path = pp.peft_folder_loads(ADALORA, tmp_path, family, {**opts, "target_r": 2}, before_save=lambda peft:
                                          _allocate(peft.named_parameters, steps, peft.base_model.update_and_allocate))
    pattern = json.loads((tmp_path / "adapter/adapter_config.json").read_text())["rank_pattern"]
    assert (pattern is None) == (steps == 0)
    assert adapter_configs(model)["default"].rank_pattern == pattern
    for key, keep in (pattern or {}).items():  # the dropped triplets are gone from the tensors
        assert model.get_submodule(key.removesuffix(".lora_E")).lora_A["default"].shape[0] == sum(keep)
    assert not pattern or sum(map(sum, pattern.values())) == 2 * len(pattern) < sum(map(len, pattern.values()))
    trainable = mc.load_adapter(mc.load_model(path), tmp_path / "adapter", is_trainable=True)
    if steps:  # PEFT's allocator would fail mid-run on the cut tensors: refused before the first step
        with pytest.raises(ValueError, match="AdaLoRA adapter 'default' was saved pruned"):
            adapter_configs(trainable)["default"].training_hooks(trainable, "default", 10)
    else:
        assert adapter_configs(trainable)["default"].training_hooks(trainable, "default", 10) is not None


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, case):
    """PeftModel.from_pretrained reads our folder (pruned by its rank_pattern), adapts the same modules and gives
    our logits; our folder loads back here bit for bit, merged or not (pruned, the reloaded layers sum fewer
    (zero) terms in another order: equal within the parity tolerance)."""
    family, opts, steps = FOLDERS[case]
    hooks = []

    def allocate(model):
        hooks.append(adapter_configs(model)["default"].training_hooks(model, "default", 10))
        _allocate(model.named_parameters, steps, hooks[0].after_step)

    pp.our_folder_loads(ADALORA, tmp_path, family, {**opts, "target_r": 2, "total_step": 10},
                        same=pp.within_tol if steps else torch.equal, before_save=allocate)
    saved = load_file(tmp_path / "adapter/adapter_model.safetensors")
    assert sum(t.shape[0] for k, t in saved.items() if k.endswith("lora_E")) == (
        hooks[0].init_bgt if not steps else sum(map(sum, hooks[0].config.rank_pattern.values())))


def test_folder_keys_and_config_are_peft_s(ckpt, tmp_path):
    """The file holds exactly PEFT's keys and shapes, and adapter_config.json every field PEFT writes for ADALORA
    (but peft_version, which PEFT stamps itself), with the same values."""
    peft = ADALORA.peft(make_checkpoint(tmp_path / "hf", "smollm")[1])
    ours, _ = pp.saved_as_peft_saves(mc.apply_adalora(mc.load_model(ckpt), total_step=10, verbose=False), peft,
                                     tmp_path)
    assert {k.rsplit(".", 1)[-1] for k in ours} == set(FACTORS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_E" in ours


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(init_r=0), "AdaLoRA option init_r must be a positive integer, found 0"),
    (dict(tinit=-1), "AdaLoRA option tinit must be an integer >= 0, found -1"),
    (dict(beta1=1.0), r"AdaLoRA option beta1 must be in \(0, 1\), found 1.0"),
    (dict(orth_reg_weight=-0.5), "AdaLoRA option orth_reg_weight must be a finite number >= 0, found -0.5"),
    (dict(total_step=0), "AdaLoRA option total_step must be a positive integer, or None"),
    (dict(init_r=8), "AdaLoRA prunes from init_r down to target_r: target_r 8 must be below init_r 8"),
    (dict(total_step=5, tinit=3, tfinal=2), "AdaLoRA's schedule leaves no step to prune ranks in: tinit 3 \\+ "
                                            "tfinal 2 >= total_step 5"),
    (dict(targets=["q_proj", "nope"]), "cannot attach AdaLoRA: target 'nope' matches no module"),
    (dict(targets=["input_layernorm"]), "cannot attach AdaLoRA: model.layers.0.input_layernorm is a RMSNorm; "
                                        "AdaLoRA targets nn.Linear"),
])
def test_bad_options_are_one_line_before_anything_changes(ckpt, options, message):
    pp.attach_refused(ADALORA, ckpt, options, message)


def test_the_registry_entry():
    entry = get_method("adalora")
    assert entry.peft_type == "ADALORA" and entry.mergeable
    assert entry.defaults() == dict(init_r=12, target_r=8, alpha=8.0, targets=None, tinit=0, tfinal=0, delta_t=1,
                                    orth_reg_weight=0.5)


@pytest.fixture
def saved(ckpt, tmp_path):
    return pp.saved_perturbed(ADALORA, ckpt, tmp_path / "adapter", init_r=4, target_r=2, total_step=10)


def test_a_folder_that_does_not_fit_is_refused_before_anything_changes(ckpt, saved):
    config, good = pp.folder_contents(saved)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B"
    pattern = {f"model.layers.{i}.self_attn.{m}.lora_E": [True, False, True, False] for i in (0, 1)
               for m in ("q_proj", "v_proj")}
    pp.each_folder_refused(ADALORA, ckpt, saved, [  # (config, tensors, message)
        (config, {**good, key: torch.ones(24, 3)}, rf"{key}: shape \(24, 3\), expected \(24, 4\)"),
        (config, {k: v for k, v in good.items() if k != key}, f"{key} is missing"),
        ({**config, "init_r": 5}, good, r"lora_A: shape \(4, 72\), expected \(5, 72\)"),
        ({**config, "rank_pattern": pattern}, good, r"lora_A: shape \(4, 72\), expected \(2, 72\) \(rank from "
                                                    "rank_pattern or init_r\\)"),
        ({**config, "rank_pattern": {"model.layers.0.mlp.up_proj.lora_E": [True] * 4}}, good,
         "rank_pattern key 'model.layers.0.mlp.up_proj.lora_E' is not '<module>.lora_E' of a targeted module"),
        ({**config, "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True] * 3}}, good,
         r"rank_pattern\['model.layers.0.self_attn.q_proj.lora_E'\] must be 4 \(init_r\) true/false values"),
        (config, {**good, "base_model.model.model.layers.0.mlp.up_proj.lora_A": torch.ones(4, 72)},
         r"1 keys match no AdaLoRA linear of this model .*up_proj.lora_A \(not selected by target_modules\)"),
        (config, {**good, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 72)},
         "AdaLoRA's keys are base_model.model.<module>.lora_A"),
        ({**config, "target_modules": ["input_layernorm"]}, good, "input_layernorm is a RMSNorm"),
        ({**config, "tinit": 8, "tfinal": 2}, good, "tinit 8 \\+ tfinal 2 >= total_step 10"),
        ({**config, "beta2": 1.5}, good, r"AdaLoRA option beta2 must be in \(0, 1\), found 1.5"),
        *pp.unsupported(config, good, lora_dropout=0.1, bias="all", fan_in_fan_out=True, use_dora=True,
                        alpha_pattern={"q_proj": 4}, exclude_modules=["v_proj"], modules_to_save=["lm_head"],
                        layers_pattern="layers"),
        ({**config, "init_r": "4"}, good, r"field 'init_r' must be a positive integer"),
        ({**config, "deltaT": 0}, good, r"field 'deltaT' must be a positive integer"),
    ])


# -- the trainer's hooks and the command line --------------------------------------------------------

def _train(setup, out, resume=False, on_step=None, **options):
    """6 steps of SFT on the setup data with AdaLoRA init_r 4 -> target_r 2 on q_proj, v_proj of 2 layers (a
    budget of 16 -> 8), tinit 1, tfinal 2: total_step comes from the run."""
    root, path = setup
    tok, model = mc.load_tokenizer(path), mc.load_model(path)
    torch.manual_seed(0)
    apply_method(model, "adalora", **{"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, **options})
    examples = load_examples(root / "train.jsonl", tok, max_length=128, report=lambda *a: None)
    config = TrainConfig(max_steps=6, batch_size=2, max_length=128, exact_match=0, save_every=3, lr=1e-2)
    rows = train(model, examples, config, out, resume=resume, on_step=on_step, options={"method": "adalora"})
    return model, [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_training_adds_the_regularizer_allocates_ranks_and_resumes_exactly(setup, tmp_path):
    """The loop's hooks: each step's loss carries the regularizer (logged; step 1's is the initial factors'),
    the ranks end at the budget, and a run cut at step 3 resumes onto the same factors, masks and metrics, which
    needs the allocator's averages saved with the checkpoint (without them the run goes elsewhere)."""
    root, path = setup
    fresh = mc.load_model(path)
    torch.manual_seed(0)
    apply_method(fresh, "adalora", init_r=4, target_r=2)
    with torch.no_grad():
        reg0 = float(adapter_configs(fresh)["default"].training_hooks(fresh, "default", 6).regularizer())
    model, straight = _train(setup, tmp_path / "straight")
    config = adapter_configs(model)["default"]
    assert config.total_step == 6 and all("regularizer" in r for r in straight)
    assert straight[0]["regularizer"] == pytest.approx(reg0, rel=1e-6) and reg0 > 0
    assert sum(map(sum, config.rank_pattern.values())) == 8 and len(config.rank_pattern) == 4
    assert sum(int((m.lora_E["default"] == 0).sum()) for m in model.modules() if isinstance(m, AdaLoraLinear)) == 8

    def cut(step, record):
        if step == 3:
            raise RuntimeError("cut at step 3")
    with pytest.raises(RuntimeError, match="cut at step 3"):
        _train(setup, tmp_path / "cut", on_step=cut)
    state = load_file(tmp_path / "cut/checkpoints/checkpoint-000003/method.safetensors")
    assert len([k for k in state if k.startswith("default\x1fipt\x1f")]) == 12
    shutil.copytree(tmp_path / "cut", tmp_path / "bare")
    (tmp_path / "bare/checkpoints/checkpoint-000003/method.safetensors").unlink()
    resumed, rows = _train(setup, tmp_path / "cut", resume=True)
    assert rows == straight and adapter_configs(resumed)["default"].rank_pattern == config.rank_pattern
    assert all(torch.equal(p, ADALORA.params(model)[n]) for n, p in ADALORA.params(resumed).items())
    bare, _ = _train(setup, tmp_path / "bare", resume=True)
    assert not all(torch.equal(p, ADALORA.params(model)[n]) for n, p in ADALORA.params(bare).items())


def test_a_schedule_without_a_pruning_phase_is_refused_before_training(setup, tmp_path, capsys):
    """total_step comes from the run (5 steps): tinit 3 + tfinal 2 leave none to prune in; nothing is written."""
    root, path = setup
    err = fails(["train", "sft", "--model", path, "--data", root / "train.jsonl", "--out", tmp_path / "run",
                 "--method", "adalora", "--init-r", "4", "--target-r", "2", "--tinit", "3", "--tfinal", "2",
                 "--max-steps", "5", "--batch-size", "2", "--max-length", "64", "--exact-match", "0"], capsys)
    assert "AdaLoRA's schedule leaves no step to prune ranks in: tinit 3 + tfinal 2 >= total_step 5" in err
    assert not (tmp_path / "run").exists()


def test_train_prunes_to_the_budget_and_peft_loads_the_folder(setup, tmp_path):
    """`train sft --method adalora` over 4 steps: the rank pattern keeps target_r·n = 8 of 16 triplets, the saved
    tensors hold just those, total_step is the run's, and PEFT loads the folder with our logits; `merge` folds it."""
    from transformers import AutoModelForCausalLM

    root, path = setup
    out = tmp_path / "run"
    main([str(a) for a in ["train", "sft", "--model", path, "--data", root / "train.jsonl", "--out", out, "--method",
                           "adalora", "--init-r", "4", "--target-r", "2", "--tinit", "1", "--tfinal", "1",
                           "--max-length", "128", "--batch-size", "2", "--max-steps", "4", "--lr", "1e-2",
                           "--exact-match", "0", "--seed", "1"]])
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["init_r"], config["target_r"], config["total_step"]) == ("ADALORA", 4, 2, 4)
    assert len(config["rank_pattern"]) == 4 and sum(map(sum, config["rank_pattern"].values())) == 8
    tensors = load_file(out / "adapter_model.safetensors")
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_E")) == 8
    assert all(t.abs().min() > 0 for k, t in tensors.items() if k.endswith(".lora_E"))  # the kept ones trained

    model = mc.load_adapter(mc.load_model(path), out)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), out).eval()
    ids = torch.randint(3, 400, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(ids)
        pp.close(peft(input_ids=ids).logits, adapted, "PEFT on our folder")
        with mc.disable_adapters(model):
            assert (adapted - model(ids)).abs().max() > 1e-3  # 4 steps at lr 1e-2 moved E off zero
    main(["merge", "--model", str(path), "--adapter", str(out), "--out", str(tmp_path / "merged")])
    with torch.no_grad():
        pp.close(mc.load_model(tmp_path / "merged")(ids), adapted, "merged checkpoint")
