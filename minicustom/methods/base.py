"""What every method shares: the adapter-layer protocol, target selection, named adapters, merging and
unloading, and the registry entry (`Method`) each method file declares.

A method attaches by swapping modules for `AdapterLayer`s (LoRA, IA3, bottleneck adapters), or by
setting the model's `kv_prefix` seam to one (prefix tuning, prompt tuning, p-tuning, LLaMA-Adapter).
Either way the layer holds one or more *named* adapters, and `active` lists the ones applied; so
`set_adapter`, `disable_adapters` (the DPO reference policy), `delete_adapter`, `merge_adapters`,
`unload` and `save_adapter` work the same for every method. `model.adapter_configs` (declared by the
model) maps each adapter name to its method's config dataclass, which is how saving knows the method.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..argtypes import COUNT
from ..quant.linear4bit import Linear4bit


class AdapterLayer(nn.Module):
    """A module carrying named adapters. Subclasses set `active` (applied adapters, in order) and
    `merged` (adapters folded into the base weights), and implement the methods below."""

    active: list[str]
    merged: dict
    # True for a layer that wraps a whole sublayer and registers the sublayer's own children under their
    # names (so base keys do not move): those children stay visible as targets to other methods.
    transparent: bool = False
    # False for methods with nothing to fold into a weight (nonlinear adapters, prefixes): merge raises.
    mergeable: bool = True

    @property
    def adapters(self) -> list[str]:
        raise NotImplementedError

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's trainable tensors, under its file keys (relative to this module's name)."""
        raise NotImplementedError

    def delete(self, name: str):
        raise NotImplementedError

    def merge(self, name: str):
        raise ValueError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self, name: str):
        raise ValueError(f"{type(self).__name__} cannot be merged into the base weights")

    def base(self) -> nn.Module | None:
        """The plain module this layer replaced (None for the kv_prefix seam, which replaced nothing)."""
        raise NotImplementedError


def layer_index(name: str) -> int | None:
    m = re.search(r"\blayers\.(\d+)\.", name)
    return int(m[1]) if m else None


def linear_like(module: nn.Module) -> bool:
    if isinstance(module, AdapterLayer):
        module = module.base()
    return isinstance(module, (nn.Linear, Linear4bit))


def find_targets(model: nn.Module, targets, layers=None) -> list[str]:
    """Module names selected by `targets`: "all-linear" (every nn.Linear except lm_head), one regex
    string (full match on the module name), or a list of names (equal to, or ending in '.' + name)."""
    names, inside = [], ()
    for name, module in model.named_modules():
        if name.startswith(inside):
            continue  # the parameters and copies that adapter layers hold are never targets
        if isinstance(module, AdapterLayer) and not module.transparent:
            inside = inside + (name + ".",)
        if targets == "all-linear":
            hit = linear_like(module) and name != "lm_head"
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit and layers is not None:
            hit = layer_index(name) in layers
        if hit:
            names.append(name)
    return names


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def adapter_configs(model: nn.Module) -> dict:
    """The model's adapter name -> config map: the Transformer declares it; any other module (a test's
    nn.Sequential, say) is given one on first use."""
    if not hasattr(model, "adapter_configs"):
        model.adapter_configs = {}
    return model.adapter_configs


def register_config(model: nn.Module, name: str, config) -> dict:
    """Record `config` as adapter `name` of the model (an error if the name is taken)."""
    configs = adapter_configs(model)
    if name in configs:
        raise ValueError(f"an adapter named {name!r} already exists; delete it or pick another name")
    configs[name] = config
    return configs


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once, 4-bit weights included."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    total += sum(m.state.numel for m in model.modules() if isinstance(m, Linear4bit))  # 4-bit weights are buffers
    return trainable, total


def report(model: nn.Module, what: str):
    trainable, total = count_parameters(model)
    print(f"{what}, trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")


def set_adapter(model: nn.Module, names: str | list[str]):
    """Make `names` the active adapter(s); only their parameters are trainable."""
    names = [names] if isinstance(names, str) else list(names)
    known = set(adapter_configs(model))
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"no adapter named {unknown}; adapters: {sorted(known)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
        for n in layer.active:
            for p in layer.adapter_state(n).values():
                p.requires_grad_(True)


def delete_adapter(model: nn.Module, name: str):
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; adapters: {sorted(configs)}")
    for _, layer in adapter_layers(model):
        layer.delete(name)
    del configs[name]


@contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model exactly: no adapter applied inside the block (the DPO reference policy)."""
    layers = adapter_layers(model)
    if merged := sorted({n for _, layer in layers for n in layer.merged}):
        raise ValueError(f"adapters {merged} are merged into the base weights; unmerge them first")
    saved = [layer.active for _, layer in layers]
    for _, layer in layers:
        layer.active = []
    try:
        yield model
    finally:
        for (_, layer), active in zip(layers, saved):
            layer.active = active


class PrefixLayer(AdapterLayer):
    """What the modules of the model's kv_prefix seam share (prefix tuning, prompt tuning, LLaMA-Adapter):
    one ModuleDict of named adapters (`encoders()`, under the method's own attribute name), of which one
    at a time is applied; nothing to merge, and no module replaced (unload removes them)."""

    mergeable = False
    name_of_method: str

    def __init__(self):
        super().__init__()
        self.active: list[str] = []
        self.merged: dict = {}

    def encoders(self) -> nn.ModuleDict:
        """The named adapters: name -> the module that makes that adapter's prefix."""
        raise NotImplementedError

    def active_adapter(self) -> nn.Module | None:
        if not self.active:
            return None
        if len(self.active) > 1:
            raise ValueError(f"{self.name_of_method} applies one adapter at a time; active: {self.active}")
        return self.encoders()[self.active[0]]

    @property
    def adapters(self) -> list[str]:
        return list(self.encoders())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.encoders()[name].named_parameters())

    def delete(self, name: str):
        del self.encoders()[name]
        self.active = [a for a in self.active if a != name]

    def base(self) -> None:
        return None


def prefix_layer(model: nn.Module, cls: type[PrefixLayer], *args) -> PrefixLayer:
    """The model's kv_prefix module of type `cls`, made (cls(*args)) on first use; an error if another
    method holds the seam (one prefix method at a time)."""
    if model.kv_prefix is None:
        model.kv_prefix = cls(*args)
    if not isinstance(model.kv_prefix, cls):
        raise ValueError(f"the model's kv_prefix already holds {type(model.kv_prefix).__name__}; "
                         f"{cls.name_of_method} cannot be combined with it")
    return model.kv_prefix


class LinearAdapterLayer(AdapterLayer):
    """An adapter layer over one linear (LoRA, IA3, sequential bottleneck adapters). An nn.Linear's W and
    b become this module's own `weight`/`bias`, so base keys do not move; a 4-bit `Linear4bit` is held
    as `base_layer` (it adds its own bias) and dequantized where W is needed."""

    def hold(self, base: nn.Module):
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, Linear4bit):
            self.base_layer = base
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        else:
            self.base_layer = None
            self.weight, self.bias = base.weight, base.bias  # W (out, in), b (out,): frozen

    def base_forward(self, x):
        return F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)

    def factory(self) -> dict:
        """device and dtype for new adapter tensors: the weight's, or the 4-bit base's compute dtype."""
        q = self.base_layer
        if q is None:
            return dict(device=self.weight.device, dtype=self.weight.dtype)
        return dict(device=q.state.packed.device, dtype=q.compute_dtype)

    def base(self) -> nn.Module:
        """A plain nn.Linear sharing this module's (possibly merged) weight and bias, or the 4-bit base."""
        if self.base_layer is not None:
            return self.base_layer
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight, lin.bias = self.weight, self.bias
        return lin


class FactoredLinear(LinearAdapterLayer):
    """A linear whose adapters are each an update ΔW (out, in) built from factors (LyCORIS's LoHa, LoKr):
    y = W0 x + b + Σ_active ΔW x; merging adds ΔW to W0 and unmerging subtracts it. A subclass names its
    factors' ParameterDicts in FACTORS (their attribute names are the file keys; an adapter may use only
    some of them), creates them, and computes `delta_weight(name)`."""

    FACTORS: tuple[str, ...] = ()
    method = ""  # the method's name, for messages

    def __init__(self, base: nn.Linear | Linear4bit):
        super().__init__()
        self.hold(base)
        self.scaling: dict[str, float] = {}  # name -> s = alpha / r
        self.active: list[str] = []
        self.merged: dict[str, None] = {}

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        y = self.base_forward(x)
        for name in self.active:
            if name not in self.merged:
                dw = self.delta_weight(name)
                y = y + F.linear(x.to(dw.dtype), dw)  # (B, T, in) @ (in, out) -> (B, T, out)
        return y.to(x.dtype)

    @torch.no_grad()
    def merge(self, name: str):
        if name in self.merged:
            return
        if self.base_layer is not None:
            raise ValueError(f"the base is 4-bit and cannot take {self.method}'s ΔW in place (qlora.merge_4bit folds "
                             "LoRA only); keep the adapter unmerged, or load the base in full precision to merge")
        self.weight.add_(self.delta_weight(name).to(self.weight.dtype))
        self.merged[name] = None

    @torch.no_grad()
    def unmerge(self, name: str):
        if name in self.merged:
            del self.merged[name]
            self.weight.sub_(self.delta_weight(name).to(self.weight.dtype))

    def delete(self, name: str):
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        for f in self.FACTORS:
            if name in getattr(self, f):
                del getattr(self, f)[name]
        self.scaling.pop(name, None)
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(dict.fromkeys(n for f in self.FACTORS for n in getattr(self, f)))

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f)[name] for f in self.FACTORS if name in getattr(self, f)}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapters}"


def plan_linears(model: nn.Module, config, cls: type[AdapterLayer], method: str) -> tuple[list[str], list[str]]:
    """([names of the linears that config.targets and config.layers select], [problems]) for attaching a
    `cls` of `method`; changes nothing."""
    plan, problems = [], []
    for name in find_targets(model, config.targets, config.layers):
        module = model.get_submodule(name)
        if isinstance(module, cls) and module.merged:
            problems.append(f"{name} has adapter {list(module.merged)} merged; unmerge it before adding another")
        elif isinstance(module, AdapterLayer) and not isinstance(module, cls):
            problems.append(f"{name} already carries a {type(module).__name__}; {method} cannot be stacked on it")
        elif not linear_like(module):
            problems.append(f"{name} is a {type(module).__name__}; {method} targets nn.Linear (Conv layers are left out)")
        else:
            plan.append(name)
    return plan, problems


def plan_or_refuse(model: nn.Module, config, cls: type[AdapterLayer], method: str) -> list[str]:
    """plan_linears' plan, where every name in a list of targets selects a module and everything selected
    is a linear; otherwise one line: the first problem, how many more, and the names of the linears here."""
    plan, problems = plan_linears(model, config, cls, method)
    if isinstance(config.targets, list):
        problems += [f"target {t!r} matches no module" for t in config.targets
                     if not find_targets(model, [t], config.layers)]
    if not plan and not problems:
        problems.append(f"targets {config.targets!r} match no module")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        names = ", ".join(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if linear_like(m)}))
        raise ValueError(f"cannot attach {method}: {problems[0]}{more}; linear modules here are named {names}")
    return plan


class TrainableCopy(AdapterLayer):
    """modules_to_save: a full trainable copy of a module per adapter; the original stays as the base
    (its parameters registered here under their own names, so base keys do not move)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.original = [base]  # a list, so it is not registered twice
        for n, p in base.named_parameters(recurse=False):
            self.register_parameter(n, p)
        self.modules_to_save = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: dict = {}

    def add(self, name: str, *_):
        copy_ = copy.deepcopy(self.original[0])
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def forward(self, x):
        for name in self.active:
            if name in self.modules_to_save:
                return self.modules_to_save[name](x)
        return self.original[0](x)

    def merge(self, name: str):
        raise ValueError("a modules_to_save copy cannot be merged; unload keeps the active copy instead")

    unmerge = merge

    def delete(self, name: str):
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.modules_to_save)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].named_parameters())

    def base(self) -> nn.Module:
        return self.original[0]


def merge_adapters(model: nn.Module, names=None):
    """Fold the active (or named) adapters into the base weights, each layer by its own rule (LoRA
    W0 <- W0 + s B A, IA3 W <- l ⊙ W, ...); methods with nothing to fold (prefixes, bottleneck adapters)
    refuse, before anything is merged."""
    todo = [(name, layer, [n for n in (names or layer.active) if n in layer.adapters])
            for name, layer in adapter_layers(model) if not isinstance(layer, TrainableCopy)]
    for name, layer, adapters in todo:  # checked before anything is merged
        if adapters and not layer.mergeable:
            layer.merge(adapters[0])  # raises, saying why
        if adapters and getattr(layer, "weight", None) is not None and _is_tied(model, layer.weight):
            raise ValueError(f"cannot merge into {name}: its weight is tied to another module (embed_tokens and "
                             "lm_head share the matrix), which would change too")
    for _, layer, adapters in todo:
        for n in adapters:
            layer.merge(n)


def unmerge_adapters(model: nn.Module):
    for _, layer in adapter_layers(model):
        for n in reversed(list(layer.merged)):  # last merged, first unmerged: undoes a product or a DoRA rescale
            layer.unmerge(n)


def _is_tied(model, weight) -> bool:
    return sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) > 1


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter layer by a plain module: merged first (merge=True) or discarded. A
    modules_to_save copy that is active replaces its original. Returns the plain model."""
    if merge:
        merge_adapters(model)
    else:
        unmerge_adapters(model)
    for name, layer in adapter_layers(model):
        if isinstance(layer, TrainableCopy) and merge and layer.active:
            model.set_submodule(name, layer.modules_to_save[layer.active[0]])
        else:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base())  # None empties the kv_prefix seam
    adapter_configs(model).clear()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every active adapter that can be folded into the base and return the plain model."""
    return unload(model, merge=True)


# -- the registry entry each method file declares (methods/registry.py lists them) ------------------

def targets_option(text: str):
    """--targets on the command line: all-linear, or module names separated by commas (each equal to, or
    the end of, a module's name: q_proj selects every layer's)."""
    return text if text == "all-linear" else [t for t in text.split(",") if t]


@dataclass(frozen=True)
class Option:
    """One hyperparameter of a method: the keyword its apply function takes, and the command line's
    --name (underscores as dashes). `type` parses the command-line text (argparse's type=)."""

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple | None = None
    flag: bool = False  # a switch: --name sets True

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")


# An option several methods share, declared once so that its flag means one thing.
VIRTUAL_TOKENS = Option("num_virtual_tokens", 20, "virtual tokens: the learned prompt's (or prefix's) length",
                        type=COUNT)


@dataclass(frozen=True)
class Method:
    """A registry entry: `apply(model, **options)` attaches the method (and returns the model); `lr` is
    the learning rate it usually wants; `mergeable` says whether merging folds it into the base weights;
    `peft_type` names its adapter folders (None: a full checkpoint is written); `variant_of` marks a
    variant (rsLoRA of LoRA, ...) that compare leaves out unless asked; `uses_tokenizer` passes the
    tokenizer to apply as `tokenizer=`; `targetable(module)` says which modules its `targets` may name
    (None: linear and embedding layers). Adapter folders of `peft_type` are written by `to_peft(model,
    name)` -> (adapter_config, tensors, extra files) and read by `load_peft(model, path, config, tensors,
    name)`, which checks everything before it touches the model."""

    name: str
    apply: Callable[..., nn.Module]
    help: str
    lr: float
    mergeable: bool
    peft_type: str | None = None
    options: tuple[Option, ...] = ()
    variant_of: str | None = None
    uses_tokenizer: bool = False
    to_peft: Callable | None = field(default=None, repr=False)
    load_peft: Callable | None = field(default=None, repr=False)
    targetable: Callable[[nn.Module], bool] | None = field(default=None, repr=False)  # None: linears, embeddings

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}
