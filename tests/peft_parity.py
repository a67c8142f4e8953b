"""The scaffolding the PEFT-method tests share (LoHa, LoKr, HRA, OFT, BOFT, AdaLoRA, VeRA, LN tuning, trainable
tokens): a `Method` says how a method attaches, what PEFT calls it and how its parameters are perturbed; the
functions below are the checks every such file makes, the invariants and the round trips with PEFT, each
asserting as the files did. What stays in a method's file is its own: its config, its equation, its tolerances
where they are not the shared one, its bad inputs.

Tolerances: TOL is the parity bound each file derives (logits and gradients divided by the reference's largest
entry, atol 1e-5, rtol 0: ten times a few ulps per op compounded over 2-3 layers). Where a check is exact it says
so (torch.equal); the bound for restoring W0 by unmerging is the method's, passed in.
"""

import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import (
    adamw_step_changes,
    close_to_largest,
    disabled_is_the_base,
    greedy_uncached,
    make_checkpoint,
    matches_peft,
    token_ids,
)
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import minicustom as mc
from minicustom.cli import main
from minicustom.methods import apply_method
from minicustom.prompting import default_stop_ids

TOL = 1e-5  # logits and gradients against PEFT, divided by the reference's largest entry
PREFIX = "base_model.model."
EPS = torch.finfo(torch.float32).eps
# What the error of a target that is not a linear ends by listing, on SmolLM.
LINEARS_HERE = "linear modules here are named down_proj, gate_proj, k_proj, lm_head, o_proj"


def normal(std: float, mean: float = 0.0):
    """A draw for Method.draw: mean + std·N(0, 1), whatever the parameter held."""
    return lambda name, p, g: mean + std * torch.randn(p.shape, generator=g)


def renamed(**names: str):
    """Our options -> PEFT's config fields: targets and layers by PEFT's names, and `names` (ours=theirs)."""
    names = {"targets": "target_modules", "layers": "layers_to_transform", **names}
    return lambda opts: {names.get(k, k): v for k, v in opts.items()}


@dataclass(frozen=True)
class Method:
    name: str  # as its messages name it ("LoHa")
    key: str  # its registry name ("loha")
    apply: Callable  # mc.apply_loha
    peft_config: type  # peft.LoHaConfig
    layers: type | tuple  # the module(s) it swaps in
    markers: tuple[str, ...]  # substrings of its parameters' names (from their first dot on), and of no other
    draw: Callable  # (name, parameter, generator) -> the perturbed value: large enough to move logits by O(1)
    to_peft: Callable = field(default_factory=renamed)  # our options -> PEFT's fields
    peft_defaults: dict = field(default_factory=dict)  # fields every PEFT config of these tests carries
    quiet_peft: bool = False  # PEFT warns on some of these tests' configs (VeRA's seed-only folders)

    def owns(self, name: str) -> bool:
        """`name` is one of the method's parameters, in a model or in a bare layer ("hada_w1_a.a": no dot before)."""
        return any(m in "." + name for m in self.markers)

    def params(self, model) -> dict[str, torch.Tensor]:
        """{name: parameter} of the method's parameters, PEFT's names mapped to ours."""
        return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if self.owns(n)}

    @torch.no_grad()
    def perturb(self, named_params, seed: int = 0):
        """Every parameter of the method := draw, in name order (PEFT's names without PREFIX equal ours, so two
        models with the same names get the same values)."""
        g = torch.Generator().manual_seed(seed)
        owned = sorted((n, p) for n, p in ((n.removeprefix(PREFIX), p) for n, p in named_params) if self.owns(n))
        assert owned, f"no parameter matches {self.markers}: nothing would be perturbed"
        for name, p in owned:
            p.copy_(self.draw(name, p, g))

    def peft(self, hf, **fields):
        with warnings.catch_warnings():
            if self.quiet_peft:
                warnings.simplefilter("ignore")
            return get_peft_model(hf, self.peft_config(task_type="CAUSAL_LM", **{**self.peft_defaults, **fields}))

    def peft_from(self, hf, folder):
        with warnings.catch_warnings():
            if self.quiet_peft:
                warnings.simplefilter("ignore")
            return PeftModel.from_pretrained(hf, folder).eval()

    @torch.no_grad()
    def copy_peft_into(self, model, peft):
        ours, theirs = self.params(model), self.params(peft)
        assert set(ours) == set(theirs)
        for n, p in ours.items():
            p.copy_(theirs[n])

    def untouched(self, model) -> bool:
        return not any(isinstance(m, self.layers) for m in model.modules()) and not getattr(model, "adapter_configs", {})


def close(out, ref, what: str = ""):
    close_to_largest(out, ref, TOL, what)


def within_tol(out, ref) -> bool:
    """close() as a predicate, for checks that take one (our_folder_loads' same)."""
    close(out, ref, "reloaded")
    return True


def adapter_matters(model, ids, out):
    """The adapter moves the logits by more than 0.1 (against TOL of them): agreeing with a reference is not
    agreeing with the base."""
    with torch.no_grad(), mc.disable_adapters(model):
        assert (out - model(ids)).abs().max() > 0.1


def trainable_shapes(model, expected: dict) -> tuple[int, int]:
    """Exactly `expected` ({name: shape}) trains, and count_parameters counts it; returns (trainable, total)."""
    assert {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad} == expected
    n, total = mc.count_parameters(model)
    assert n == sum(math.prod(s) for s in expected.values())
    return n, total


# -- invariants ---------------------------------------------------------------------------------------

def exact_at_init(method: Method, path, noisy: bool = True, **opts):
    """Attached with its default init the model gives the base's logits bit for bit; with init_weights=False
    (where the method has it) not. Returns the model."""
    base = mc.load_model(path)
    model = method.apply(mc.load_model(path), verbose=False, **opts)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))
        if noisy:
            other = method.apply(mc.load_model(path), verbose=False, **{**opts, "init_weights": False})
            assert not torch.equal(other(ids), base(ids))
    return model


def adamw_moves_every_trainable(model):
    """One AdamW step: the base bit-identical (adamw_step_changes), every trainable parameter moved (at least by
    weight decay, where a zero factor gives others a zero first gradient)."""
    changed = adamw_step_changes(model.train(), token_ids())
    assert sorted(changed) == sorted(n for n, p in model.named_parameters() if p.requires_grad)


def disabling_gives_the_base(method: Method, path, **opts):
    """apply_method by registry name, perturbed: disable_adapters gives the base's logits bit for bit and back;
    once merged, disabling is refused."""
    base = mc.load_model(path)
    model = apply_method(mc.load_model(path), method.key, **opts)
    method.perturb(model.named_parameters())
    ids = token_ids()
    adapted = disabled_is_the_base(model, base, ids)
    with torch.no_grad():
        adapter_matters(model, ids, adapted)
        mc.merge_adapters(model)
        with pytest.raises(ValueError, match="merged into the base weights"), mc.disable_adapters(model):
            pass


def merge_unmerge_unload(method: Method, path, restore_atol: Callable, **opts):
    """Merged, the forward is the unmerged one within TOL (and every adapted weight changed); unmerged, each W0
    comes back within restore_atol(layer, W0) (the method's bound, taken before merging) and the forward with
    it; merge_adapter leaves the base's keys and none of the method's modules, with the same logits."""
    base_keys = set(mc.load_model(path).state_dict())
    model = method.apply(mc.load_model(path), verbose=False, **opts)
    method.perturb(model.named_parameters())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, method.layers)}
    w0 = {n: m.weight.detach().clone() for n, m in layers.items()}
    ids = token_ids()
    with torch.no_grad():
        before = model(ids)
        adapter_matters(model, ids, before)
        atols = {n: restore_atol(m, w0[n]) for n, m in layers.items()}
        mc.merge_adapters(model)
        assert all(not torch.equal(m.weight, w0[n]) for n, m in layers.items())
        close(model(ids), before, "merged")
        mc.unmerge_adapters(model)
        for n, m in layers.items():
            torch.testing.assert_close(m.weight, w0[n], atol=atols[n], rtol=0)
        close(model(ids), before, "unmerged")
        plain = mc.merge_adapter(model)
        close(plain(ids), before, "unloaded")
    assert set(plain.state_dict()) == base_keys and not any(isinstance(m, method.layers) for m in plain.modules())


def additive_restore_atol(layer, w0) -> float:
    """Unmerging subtracts the ΔW merging added: W0 comes back within one rounding of |W0| + |ΔW|."""
    return 2 * EPS * (w0.abs() + layer.delta_weight("default").abs()).max().item()


def on_a_4bit_base(layer_cls, add, expected: Callable, what: str, in_features: int = 70, atol: float = 1e-5):
    """A layer of layer_cls on a Linear4bit(in_features, 33) with adapter "a" (add(layer) attaches it) gives
    expected(layer, q, x) within atol, rtol atol; merging into the 4-bit base is refused, nothing merged.
    Returns (layer, q, x)."""
    torch.manual_seed(0)
    q = mc.Linear4bit.from_linear(torch.nn.Linear(in_features, 33))
    layer = layer_cls(q)
    add(layer)
    layer.active = ["a"]
    x = torch.randn(3, in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected(layer, q, x), atol=atol, rtol=atol)
        with pytest.raises(ValueError, match=f"the base is 4-bit and cannot take {what} in place"):
            layer.merge("a")
    assert not layer.merged
    return layer, q, x


def adds_delta_w(layer, q, x):
    """What an additive method gives on a 4-bit base: the 4-bit layer's output plus ΔW x."""
    return q(x) + x @ layer.delta_weight("a").T


def generates_as_uncached(method: Method, path, seq=None, **opts):
    """Cached greedy generation equals the uncached greedy loop, token for token, and differs from the base's."""
    model = method.apply(mc.load_model(path), verbose=False, **opts).eval()
    method.perturb(model.named_parameters())
    seq = token_ids(2, 5, seed=6) if seq is None else seq
    cached = model.generate(seq, max_new_tokens=15)
    assert torch.equal(cached, greedy_uncached(model, seq, 15))
    with torch.no_grad(), mc.disable_adapters(model):
        assert not torch.equal(model.generate(seq, max_new_tokens=15), cached)


# -- PEFT parity --------------------------------------------------------------------------------------

def twins(method: Method, tmp_path, family: str, **opts):
    """(folder, ours, PEFT's) on a fresh `family` checkpoint: the same options, PEFT's parameters perturbed and
    copied into ours (asserting the same names)."""
    path, hf = make_checkpoint(tmp_path / family, family)
    peft = method.peft(hf, **method.to_peft(opts))
    method.perturb(peft.named_parameters())
    model = method.apply(mc.load_model(path), verbose=False, **opts)
    method.copy_peft_into(model, peft)
    return path, model, peft


def trains_as_peft(method: Method, model, peft, count: bool = True):
    """In train mode: logits and every trainable gradient within TOL of PEFT's (matches_peft), the adapter
    mattering, and (count) as many trainable parameters as PEFT holds of the method's."""
    model.train()
    peft.train()
    ids = token_ids()
    out = matches_peft(model, peft, ids, TOL)
    adapter_matters(model, ids, out)
    if count:
        assert sum(p.requires_grad for p in model.parameters()) == len(method.params(peft))


def merged_as_peft(model, peft, exact: bool = False):
    """merge_adapter against merge_and_unload: the same parameter names, each within TOL (exact: bit for bit)."""
    merged, ref = mc.merge_adapter(model), peft.merge_and_unload()
    ours, theirs = dict(merged.named_parameters()), dict(ref.named_parameters())
    assert set(ours) == set(theirs)
    for n in ours:
        if exact:
            assert torch.equal(ours[n], theirs[n]), n
        else:
            close(ours[n], theirs[n], n)
    return merged, ref


# -- folders ------------------------------------------------------------------------------------------

def peft_folder_loads(method: Method, tmp_path, family: str, opts: dict, same_params: bool = True, before_save=None):
    """PEFT saves a perturbed adapter (before_save(peft) first, if given); minicustom loads it frozen, with the
    same parameters (same_params) and PEFT's logits within TOL, which the adapter moves. Returns (model, peft,
    the base checkpoint's folder)."""
    path, hf = make_checkpoint(tmp_path / "base", family)
    peft = method.peft(hf, **method.to_peft(opts))
    method.perturb(peft.named_parameters())
    if before_save:
        before_save(peft)
    peft.save_pretrained(tmp_path / "adapter")

    model = mc.load_adapter(mc.load_model(path), tmp_path / "adapter").eval()
    peft.eval()
    if same_params:
        assert set(method.params(model)) == set(method.params(peft))
    assert not any(p.requires_grad for p in model.parameters())
    ids = token_ids()
    with torch.no_grad():
        out = model(ids)
        close(out, peft(input_ids=ids).logits, "logits")
    adapter_matters(model, ids, out)
    return model, peft, path


def our_folder_loads(method: Method, tmp_path, family: str, opts: dict, same=torch.equal, merged_same=None,
                     same_params: bool = True, before_save=None):
    """minicustom saves a perturbed adapter (before_save(model) first, if given); PeftModel.from_pretrained reads
    it, adapts the same parameters (same_params) and gives our logits within TOL, which the adapter moves; the
    folder loads back here with the same logits (same: bit for bit unless told), and so does the folder of the
    merged adapter (merged_same, or same). Returns (model, peft, the base checkpoint's folder)."""
    path, hf = make_checkpoint(tmp_path / "base", family)
    model = method.apply(mc.load_model(path), **opts, verbose=False).eval()
    method.perturb(model.named_parameters())
    if before_save:
        before_save(model)
    mc.save_adapter(model, tmp_path / "adapter")

    peft = method.peft_from(hf, tmp_path / "adapter")
    if same_params:
        assert set(method.params(peft)) == set(method.params(model))
    ids = token_ids()
    with torch.no_grad():
        out = model(ids)
        adapter_matters(model, ids, out)
        close(peft(input_ids=ids).logits, out, "logits")
        assert same(mc.load_adapter(mc.load_model(path), tmp_path / "adapter").eval()(ids), out)
        mc.merge_adapters(model)
        mc.save_adapter(model, tmp_path / "merged")
        assert (merged_same or same)(mc.load_adapter(mc.load_model(path), tmp_path / "merged").eval()(ids), out)
    return model, peft, path


def saved_as_peft_saves(model, peft, tmp_path, ours_version: str | None = None, unordered=("target_modules",),
                        ours_differ: dict | None = None):
    """Both save: the same keys and shapes, and adapter_config.json with every field PEFT writes, the same values
    (`unordered` fields in any order); peft_version aside, which PEFT stamps itself (ours_version: the one ours
    must name), and the fields of ours_differ, where ours must hold the value given. Returns the two files'
    tensors (ours, PEFT's)."""
    peft.save_pretrained(tmp_path / "peft")
    mc.save_adapter(model, tmp_path / "ours")
    ours = load_file(tmp_path / "ours/adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    c_ours = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    c_theirs = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert c_theirs.pop("peft_version")
    if ours_version is not None:
        assert c_ours.pop("peft_version") == ours_version
    c_theirs.update(ours_differ or {})
    assert set(c_ours) == set(c_theirs)
    for key in c_ours:
        same = sorted if key in unordered else (lambda v: v)
        assert same(c_ours[key]) == same(c_theirs[key]), key
    return ours, theirs


# -- errors -------------------------------------------------------------------------------------------

def not_a_linear(name: str) -> list[tuple]:
    """(targets, message) of targets that are no linear, for `name`'s apply on SmolLM."""
    return [
        (["q_proj", "nope"], "target 'nope' matches no module"),
        (["input_layernorm"], f"model.layers.0.input_layernorm is a RMSNorm; {name} targets nn.Linear"),
        (r".*\.layers\.0\.self_attn", f"model.layers.0.self_attn is a Attention; {name} targets nn.Linear"),
    ]


def attach_refused(method: Method, path, opts: dict, match: str | None = None, model=None) -> str:
    """apply(**opts) raises a ValueError in one line matching `match` (re.search; None: any) and leaves the model
    (the one given, else a fresh load of path) as it was; returns the message."""
    model = mc.load_model(path) if model is None else model
    with pytest.raises(ValueError, match=match) as e:
        method.apply(model, **opts)
    assert "\n" not in str(e.value) and method.untouched(model)
    return str(e.value)


def folder_contents(folder) -> tuple[dict, dict]:
    """(adapter_config.json, the tensors) of a saved adapter folder."""
    return json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")


def unsupported(config: dict, tensors: dict, **fields) -> list[tuple]:
    """each_folder_refused's cases for PEFT fields minicustom leaves out: config with field=value is refused as
    `field=value is not supported`."""
    return [({**config, k: v}, tensors, re.escape(f"{k}={v!r}") + " is not supported") for k, v in fields.items()]


def saved_perturbed(method: Method, path, folder, **opts):
    """A perturbed adapter of `method` on the checkpoint at path, saved to folder; returns folder."""
    model = method.apply(mc.load_model(path), verbose=False, **opts)
    method.perturb(model.named_parameters())
    mc.save_adapter(model, folder)
    return folder


def each_folder_refused(method: Method, path, saved, cases):
    """Each (config, tensors, message) written into `saved` is refused by load_adapter with an AdapterError
    matching message, before the model changes."""
    for cfg, state, message in cases:
        (saved / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(state, saved / "adapter_model.safetensors")
        model = mc.load_model(path)
        with pytest.raises(mc.AdapterError, match=message):
            mc.load_adapter(model, saved)
        assert method.untouched(model), message


# -- the command line ---------------------------------------------------------------------------------

def cli_train(setup, out, *method_args: str) -> dict:
    """`train sft` of 3 steps on the setup data with `method_args` (--method and its options, --lr); returns the
    adapter_config.json it writes."""
    root, path = setup
    main(["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--out", str(out),
          *method_args, "--max-length", "128", "--batch-size", "2", "--max-steps", "3", "--exact-match", "0",
          "--seed", "1"])
    return json.loads((out / "adapter_config.json").read_text())


def cli_generate_and_merge(setup, out, tmp_path, capsys, exact: bool = False):
    """`generate --adapter out` answers as the library does with the folder, whose logits the training moved off
    the base's; `merge` writes a plain checkpoint with the adapted logits, within TOL (exact: bit for bit)."""
    _, path = setup
    capsys.readouterr()
    main(["generate", "--model", str(path), "--adapter", str(out), "--prompt", "Where is Paris?",
          "--max-new-tokens", "6"])
    cli_answer = capsys.readouterr().out

    model, tok = mc.load_model(path), mc.load_tokenizer(path)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Where is Paris?"}],
                                                add_generation_prompt=True)])
    with torch.no_grad():
        base = model(ids)
    mc.load_adapter(model, out)
    with torch.no_grad():
        adapted = model(ids)
    assert not torch.equal(adapted, base)
    new = model.generate(ids, max_new_tokens=6, stop=default_stop_ids(model, tok))[0, ids.shape[1]:]
    answer = tok.decode(new.tolist(), skip_special_tokens=True).strip()
    assert answer and answer in cli_answer

    main(["merge", "--model", str(path), "--adapter", str(out), "--out", str(tmp_path / "merged")])
    with torch.no_grad():
        merged = mc.load_model(tmp_path / "merged")(ids)
    if exact:
        assert torch.equal(merged, adapted)
    else:
        close(merged, adapted, "merged checkpoint")
