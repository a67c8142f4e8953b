"""Bottleneck adapters: Parameter-Efficient Transfer Learning for NLP (Houlsby et al., 2019, arXiv:1902.00751).

A small residual MLP is inserted into every block and trained while the model stays frozen:

    h <- h + W_up f(W_down h + b_down) + b_up,     W_down: (m, C),  W_up: (C, m),  m = C / reduction_factor

with f a nonlinearity (ReLU by default, as Houlsby and Pfeiffer; also GELU, SiLU, tanh). That is
2·C·m + m + C parameters per adapted site. W_down starts Kaiming-uniform (as nn.Linear) and W_up, b_up at
zero, so the model is exactly unchanged at step 0; `init_scale` > 0 draws W_up ~ N(0, init_scale) instead,
Houlsby's near-identity init (untruncated here). Placements:

- "houlsby": sequential, after the attention output and after the MLP output (wraps `self_attn.o_proj`
  and `mlp.down_proj`: h is the sublayer's output before the residual add, Houlsby's position).
- "pfeiffer" (Pfeiffer et al., 2021, AdapterFusion, arXiv:2005.00247): sequential, after the MLP only.
  AdapterHub's variants of where the residual and LayerNorm enter are left out.
- "parallel" (He et al., 2022, arXiv:2110.04366, their best placement, the FFN): the adapter reads the
  MLP's input x, y = MLP(x) + s · (W_up f(W_down x + b_down) + b_up), s = `scaling` (4 as He et al.).

Several named adapters can live in one layer, applied in `active` order: sequentially stacked
(h <- h + z_a(h), then h <- h + z_b(h)), or summed in parallel (y = MLP(x) + Σ s_a z_a(x)). Dropout, when
set, acts on the adapter's output z before it joins the residual. f makes the adapter nonlinear, so it
cannot be merged into the base weights; merging raises.

The parallel wrapper of `mlp` registers the MLP's own children (gate_proj, up_proj, down_proj) under their
names and runs the MLP's class forward on itself, so base keys do not move and other methods (LoRA) still
target and replace those children. The adapter's own tensors are Parameters in ParameterDicts, never
nn.Linear, so that "all-linear" never picks them up.

File format (PEFT has no bottleneck adapters; this one is minicustom's): adapter_config.json holds
`"peft_type": "BOTTLENECK_ADAPTER"` (PEFT refuses an unknown type instead of misreading it) and every
BottleneckConfig field; adapter_model.safetensors holds "base_model.model." + module name + "." +
`adapter_down.weight` (m, C), `adapter_down.bias` (m,), `adapter_up.weight` (C, m), `adapter_up.bias` (C,),
the module being the wrapped o_proj / down_proj, or the mlp for "parallel". The adapter's name is never
in the file, as in PEFT. Left out (adapters library has them): AdapterFusion, invertible adapters,
Compacter, per-layer reduction factors, and a learned scaling.

Dimensions: B batch, T tokens, C hidden, m bottleneck.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..argtypes import COUNT, DROPOUT
from ..quant.linear4bit import Linear4bit
from .base import (
    AdapterLayer,
    LinearAdapterLayer,
    Method,
    Option,
    adapter_configs,
    adapter_layers,
    find_targets,
    register_config,
    report,
    set_adapter,
)
from .peft_format import CONFIG_FILE, PREFIX, WEIGHTS_FILE, AdapterError

__all__ = ["BottleneckConfig", "BottleneckLinear", "ParallelAdapterMLP", "apply_adapters", "to_peft", "load_peft"]

NONLINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
PLACEMENTS = {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "pfeiffer": ["mlp.down_proj"], "parallel": ["mlp"]}


@dataclass
class BottleneckConfig:
    peft_type: ClassVar[str] = "BOTTLENECK_ADAPTER"

    reduction_factor: float = 16  # m = C // reduction_factor
    placement: str = "houlsby"
    nonlinearity: str = "relu"
    scaling: float = 4.0  # s, "parallel" only
    layers: list[int] | None = None  # only these decoder layers
    dropout: float = 0.0
    init_scale: float = 0.0  # 0: W_up = 0 (exact identity); > 0: W_up ~ N(0, init_scale)

    def __post_init__(self):
        def number(field, ok, what):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                raise ValueError(f"{field} must be {what}, got {value!r}")

        number("reduction_factor", lambda v: v > 0, "a positive number")
        number("scaling", lambda v: True, "a finite number")
        number("dropout", lambda v: 0 <= v < 1, "in [0, 1)")
        number("init_scale", lambda v: v >= 0, "a finite number >= 0")
        if not isinstance(self.placement, str) or self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} is not supported; supported: {', '.join(PLACEMENTS)}")
        if not isinstance(self.nonlinearity, str) or self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity {self.nonlinearity!r} is not supported; supported: "
                             f"{', '.join(NONLINEARITIES)}")
        if self.layers is not None and not (isinstance(self.layers, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers)):
            raise ValueError(f"layers must be a list of layer indices or None, got {self.layers!r}")

    def bottleneck(self, C: int) -> int:
        m = int(C // self.reduction_factor)
        if m < 1:
            raise ValueError(f"reduction_factor {self.reduction_factor} leaves no bottleneck for hidden size {C}")
        return m


class _Bottleneck(AdapterLayer):
    """The adapters of one site: per name, W_down (m, C), b_down (m,), W_up (C, m), b_up (C,)."""

    mergeable = False

    def _init_adapters(self, C: int):
        self.C = C
        self.adapter_down = nn.ModuleDict()  # name -> ParameterDict(weight (m, C), bias (m,))
        self.adapter_up = nn.ModuleDict()  # name -> ParameterDict(weight (C, m), bias (C,))
        self.hparams: dict[str, BottleneckConfig] = {}
        self.active: list[str] = []
        self.merged: dict = {}

    def add(self, name: str, m: int, config: BottleneckConfig):
        out = self._output_linear()  # the linear whose output z joins: its device and (compute) dtype
        out = out.base() if isinstance(out, AdapterLayer) else out
        device, dtype = ((out.state.packed.device, out.compute_dtype) if isinstance(out, Linear4bit)
                         else (out.weight.device, out.weight.dtype))
        down = nn.Linear(self.C, m, device=device, dtype=dtype)  # nn.Linear's Kaiming-uniform init of W_down, b_down
        W_up = torch.zeros(self.C, m, device=device, dtype=dtype)
        if config.init_scale > 0:
            W_up.normal_(0.0, config.init_scale)
        self.adapter_down[name] = nn.ParameterDict({"weight": down.weight, "bias": down.bias})
        self.adapter_up[name] = nn.ParameterDict({"weight": nn.Parameter(W_up),
                                                  "bias": nn.Parameter(torch.zeros_like(W_up[:, 0]))})
        self.hparams[name] = config

    def branch(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """z = W_up f(W_down h + b_down) + b_up, (B, T, C) -> (B, T, C)."""
        down, up, cfg = self.adapter_down[name], self.adapter_up[name], self.hparams[name]
        z = NONLINEARITIES[cfg.nonlinearity](F.linear(h, down["weight"], down["bias"]))  # (B, T, m)
        z = F.linear(z, up["weight"], up["bias"])  # (B, T, C)
        return F.dropout(z, cfg.dropout, self.training) if cfg.dropout > 0 else z

    def merge(self, name: str):
        raise ValueError("a bottleneck adapter is nonlinear (W_up f(W_down h)) and cannot be merged into the base "
                         "weights; keep it attached, or disable it with disable_adapters")

    unmerge = merge

    def delete(self, name: str):
        for d in (self.adapter_down, self.adapter_up, self.hparams):
            d.pop(name, None)
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_down)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{part}.{k}": p for part, d in (("adapter_down", self.adapter_down), ("adapter_up", self.adapter_up))
                for k, p in d[name].items()}

    def extra_repr(self) -> str:
        return f"C={self.C}, adapters={self.adapters}"


class BottleneckLinear(_Bottleneck, LinearAdapterLayer):
    """Sequential adapters on a linear's output: h = W x + b; h <- h + z(h). The base is an nn.Linear
    (its `weight`, `bias` kept as this module's, so base keys do not move) or a 4-bit `Linear4bit`
    (held as `base_layer`, as LoRALinear does)."""

    def __init__(self, base: nn.Linear | Linear4bit):
        super().__init__()
        self.hold(base)
        self._init_adapters(base.out_features)

    def _output_linear(self):
        return self.base()

    def forward(self, x):
        h = self.base_forward(x)  # (B, T, C)
        for name in self.active:
            h = h + self.branch(name, h)
        return h


class ParallelAdapterMLP(_Bottleneck):
    """Parallel adapters beside a whole MLP: y = MLP(x) + Σ s · z(x). Transparent: the MLP's children
    are this module's, under their own names, and stay targets for other methods."""

    transparent = True

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.original = [mlp]  # a list, so it is not registered as a child
        self.base_children = [n for n, _ in mlp.named_children()]
        for n, child in mlp.named_children():
            self.add_module(n, child)
        for n, p in mlp.named_parameters(recurse=False):
            self.register_parameter(n, p)
        self.act = mlp.act  # the MLP's nonlinearity, which its forward reads
        self._init_adapters(mlp.down_proj.out_features)

    def _output_linear(self):
        return self.down_proj

    def forward(self, x):
        # The MLP's own forward with this module as `self`: a child replaced here (LoRA on up_proj) is used.
        y = type(self.original[0]).forward(self, x)  # (B, T, C)
        for name in self.active:
            y = y + self.hparams[name].scaling * self.branch(name, x)
        return y

    def base(self) -> nn.Module:
        mlp = self.original[0]
        for n in self.base_children:  # the current children, whatever replaced them since
            setattr(mlp, n, getattr(self, n))
        return mlp


# -- attaching adapters to a model -----------------------------------------------------------------

def _sites(model: nn.Module, config: BottleneckConfig) -> tuple[list[str], int]:
    """The module names the config adapts and the bottleneck m, or a ValueError saying what is wrong."""
    n_layers = model.config.num_hidden_layers
    if config.layers is not None and (missing := [i for i in config.layers if not 0 <= i < n_layers]):
        raise ValueError(f"layers {missing} do not exist: the model has {n_layers} decoder layers (0..{n_layers - 1})")
    m = config.bottleneck(model.config.hidden_size)
    targets = PLACEMENTS[config.placement]
    names = find_targets(model, targets, config.layers)
    if not names:
        raise ValueError(f"placement {config.placement!r} adapts modules named {targets}; this model has none")
    parallel = config.placement == "parallel"
    for name in names:
        module = model.get_submodule(name)
        if parallel:  # a dense MLP (a Mixture-of-Experts block has no down_proj of its own)
            ok = isinstance(module, ParallelAdapterMLP) or not isinstance(module, AdapterLayer) and hasattr(
                module, "down_proj")
        else:
            ok = isinstance(module, (nn.Linear, Linear4bit, BottleneckLinear))
        if not ok:
            raise ValueError(f"module {name} is a {type(module).__name__}; bottleneck adapters ({config.placement}) "
                             f"wrap {'a dense MLP' if parallel else 'nn.Linear or Linear4bit'}, and one module cannot carry two "
                             "methods (the 'parallel' placement composes with LoRA on the MLP's projections)")
    return names, m


def _attach(model: nn.Module, names: list[str], m: int, config: BottleneckConfig, adapter_name: str):
    kind = ParallelAdapterMLP if config.placement == "parallel" else BottleneckLinear
    for name in names:
        module = model.get_submodule(name)
        module = module if isinstance(module, kind) else kind(module)
        module.add(adapter_name, m, config)
        model.set_submodule(name, module)


def apply_adapters(model: nn.Module, reduction_factor: float = 16, placement: str = "houlsby",
                   nonlinearity: str = "relu", scaling: float = 4.0, layers=None, dropout: float = 0.0,
                   init_scale: float = 0.0, adapter_name: str = "default", verbose: bool = True,
                   config: BottleneckConfig | None = None) -> nn.Module:
    """Attach a bottleneck adapter named `adapter_name`, make it the active one, and freeze everything else.

    Returns the model (changed in place). Prints the trainable parameter count when verbose."""
    config = config or BottleneckConfig(reduction_factor=reduction_factor, placement=placement,
                                        nonlinearity=nonlinearity, scaling=scaling, layers=layers,
                                        dropout=dropout, init_scale=init_scale)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    names, m = _sites(model, config)
    _attach(model, names, m, config, adapter_name)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"Bottleneck adapter '{adapter_name}' ({config.placement}, m={m}, {len(names)} sites)")
    return model


# -- files ------------------------------------------------------------------------------------------

def to_peft(model: nn.Module, adapter_name: str):
    config = adapter_configs(model)[adapter_name]
    tensors = {f"{PREFIX}{name}.{k}": t.detach().contiguous().cpu()
               for name, layer in adapter_layers(model)
               if isinstance(layer, _Bottleneck) and adapter_name in layer.adapters
               for k, t in layer.adapter_state(adapter_name).items()}
    return {"peft_type": config.peft_type, **dataclasses.asdict(config)}, tensors, {}


_OTHER_FIELDS = {"peft_type", "base_model_name_or_path", "task_type", "inference_mode", "revision"}


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Attach the adapter of a folder written by `to_peft`, after checking its config, keys and shapes."""
    fields = {f.name for f in dataclasses.fields(BottleneckConfig)}
    if unknown := sorted(set(peft) - fields - _OTHER_FIELDS):
        raise AdapterError(f"{path / CONFIG_FILE}: unknown fields {unknown}; a bottleneck adapter has {sorted(fields)}")
    if missing := sorted(fields - set(peft)):  # to_peft writes them all: a default could silently differ
        raise AdapterError(f"{path / CONFIG_FILE}: missing fields {missing}")
    try:
        config = BottleneckConfig(**{k: peft[k] for k in fields})
        names, m = _sites(model, config)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{path / CONFIG_FILE}: {e}") from None
    C = model.config.hidden_size
    shapes = {"adapter_down.weight": (m, C), "adapter_down.bias": (m,), "adapter_up.weight": (C, m),
              "adapter_up.bias": (C,)}
    expected = {f"{PREFIX}{name}.{k}": s for name in names for k, s in shapes.items()}
    problems = [f"{k}: not a tensor of this config's sites (placement {config.placement!r}, layers "
                f"{config.layers})" for k in sorted(set(tensors) - set(expected))]
    problems += [f"{k} is missing" for k in sorted(set(expected) - set(tensors))]
    problems += [f"{k}: shape {tuple(tensors[k].shape)}, expected {s} (C={C}, m={m})"
                 for k, s in expected.items() if k in tensors and tuple(tensors[k].shape) != s]
    if problems:
        raise AdapterError(f"{path / WEIGHTS_FILE}: the adapter does not fit this model:\n  " + "\n  ".join(problems))

    # Checked: now change the model.
    _attach(model, names, m, config, adapter_name)
    with torch.no_grad():
        for name in names:
            for k, p in model.get_submodule(name).adapter_state(adapter_name).items():
                p.copy_(tensors[f"{PREFIX}{name}.{k}"])
    adapter_configs(model)[adapter_name] = config


def _apply(model: nn.Module, reduction_factor=16, placement="houlsby", dropout=0.0) -> nn.Module:
    return apply_adapters(model, reduction_factor=reduction_factor, placement=placement, dropout=dropout)


BOTTLENECK = Method("adapter", _apply, "bottleneck adapters: a small down-up MLP after (or beside) each sublayer",
                    lr=1e-3, mergeable=False, peft_type="BOTTLENECK_ADAPTER", options=(
                        Option("reduction_factor", 16, "the bottleneck is hidden / this", type=COUNT),
                        Option("placement", "houlsby", "where the adapters go", choices=tuple(PLACEMENTS)),
                        Option("dropout", 0.0, "dropout on the adapter's input", type=DROPOUT)),
                    to_peft=to_peft, load_peft=load_peft)
