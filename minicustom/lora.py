"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

A frozen linear layer W0 (out, in) gets a trainable low-rank update:

    y = W0 x + b + s · B A dropout(x),      A: (r, in),  B: (out, r),  s = alpha / r

A starts Kaiming-uniform (a = √5, as nn.Linear does) and B at zero, so the model is unchanged at step 0
and only B A, never W0, is learned. Variants, as options of the same module:

- rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732): s = alpha / √r, which keeps the update's scale
  stable as r grows.
- DoRA (Liu et al., 2024, arXiv:2402.09353): W' = m · (W0 + s B A) / ||W0 + s B A||_row, with the
  magnitude m (out,) initialised to the row norms of W0 and the norm detached from the graph (§4.3), so
  y = (m / n) (W0 x + s B A x) + b. With dropout, PEFT's form is kept: the base term uses dropout(x)
  inside the correction, y = W0 x + b + (m/n - 1) W0 x' + (m/n) s B A x', x' = dropout(x).
- Init: "default" (above), "gaussian" (A ~ N(0, 1/r²)), "pissa" (Meng et al., 2024: A, B from the top-r
  singular vectors of W0, W0 replaced by the residual), "olora" (Büyükakyüz, 2024: A, B from a QR
  decomposition of W0, W0 replaced by the residual). LoftQ needs NF4 and comes with it.
- LoRA on nn.Embedding: y = E[x] + s · (A^T[x]) B^T with A (r, V) zero and B (C, r) normal, as PEFT.

Several named adapters can live in one module; `active` lists the ones applied. The module keeps the
base `weight`/`bias` as its own parameters, so base checkpoint keys do not move, and its adapter keys
are PEFT's (`lora_A.<name>.weight`, `lora_B.<name>.weight`, `lora_magnitude_vector.<name>`,
`lora_embedding_A.<name>`). Left out: LoRA on Conv layers, fan_in_fan_out (GPT-2's Conv1D), bias
training, and PEFT's many other init schemes (EVA, CorDA, ...).

Dimensions: r rank, in/out features, V vocabulary, C hidden.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import (
    AdapterLayer,
    LinearAdapterLayer,
    adapter_layers,
    count_parameters,
    delete_adapter,
    disable_adapters,
    find_targets,
    register_config,
    replace,
    set_adapter,
)
from .qlora import Linear4bit

_replace = replace  # the name the LoRA-era callers use
__all__ = ["LoraConfig", "LoRALinear", "LoRAEmbedding", "TrainableCopy", "apply_lora", "merge_lora", "unmerge_lora",
           "unload", "merge_adapter", "add_weighted_adapter", "lora_plus_param_groups", "count_parameters",
           "delete_adapter", "disable_adapters", "find_targets", "set_adapter", "adapter_layers"]

INITS = ("default", "gaussian", "pissa", "olora")


@dataclass
class LoraConfig:
    """Hyperparameters of one LoRA adapter (field names are minicustom's; adapters_io writes PEFT's)."""

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = "all-linear"  # names (suffix match), one regex (full match), "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    layers: list[int] | None = None  # only these decoder layers
    modules_to_save: list[str] | None = None  # fully trained copies (e.g. lm_head)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module-name pattern -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module-name pattern -> alpha

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r} is not supported; supported: {', '.join(INITS)}")
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if self.use_dora and self.init in ("pissa", "olora"):
            raise ValueError("DoRA with PiSSA/OLoRA init is not supported")

    def rank_alpha(self, module_name: str) -> tuple[int, float]:
        return (_pattern_value(self.rank_pattern, module_name, self.r),
                _pattern_value(self.alpha_pattern, module_name, self.alpha))

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: a pattern key applies when the module name ends with it (at a '.' boundary)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class _LoRAProduct(torch.autograd.Function):
    """y + s (x A^T) B^T, the LoRA term, in one addmm (no (..., out) temporaries for the product and the
    scaling), with a backward that lays the thin products out for the BLAS.

    Autograd would form dL/dB = s g^T (x A^T) as an (out, N) @ (N, r) product with a transposed left operand,
    and dL/d(x A^T) = s g B as (N, out) @ (out, r): both write an r-wide output, which CPU BLAS runs at a few
    GFLOPS. The same sums taken as ((x A^T)^T g)^T and (B^T g^T)^T write wide outputs and run 2-4x faster
    (about 5% of a LoRA training step on CPU). Only the order of the additions over the N rows changes.
    """

    @staticmethod
    def forward(ctx, y, x, A, B, s: float):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xa = x2 @ A.T  # (N, r)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), xa, B.T, alpha=s)  # (N, out)
        ctx.save_for_backward(x2, xa, A, B)
        ctx.s, ctx.x_shape = s, x.shape
        return out.view(*y.shape)

    @staticmethod
    def backward(ctx, g):
        x2, xa, A, B = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        g_xa = (B.T @ g2.T).T * ctx.s  # (N, r) = s g B
        grad_x = (g_xa @ A).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        grad_A = g_xa.T @ x2 if ctx.needs_input_grad[2] else None  # (r, in)
        grad_B = (xa.T @ g2).T * ctx.s if ctx.needs_input_grad[3] else None  # (out, r) = s g^T (x A^T)
        return g, grad_x, grad_A, grad_B, None


class LoRALinear(LinearAdapterLayer):
    """LoRA on an nn.Linear (W0 shared as `weight`) or on a 4-bit `Linear4bit` (QLoRA: held as `base_layer`,
    dequantized where W0 is needed)."""

    def __init__(self, base: nn.Linear | Linear4bit):
        super().__init__()
        self.hold(base)  # W0, b
        self.lora_A = nn.ModuleDict()  # name -> Linear(in, r): weight (r, in)
        self.lora_B = nn.ModuleDict()  # name -> Linear(r, out): weight (out, r)
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA: name -> m (out,)
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: dict[str, torch.Tensor | None] = {}  # name -> DoRA row norms used to merge, or None
        self.initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA: (A0, B0)

    def base_weight(self) -> torch.Tensor:
        """W0 (out, in): the weight itself, or the 4-bit base dequantized to its compute dtype."""
        return self.weight if self.base_layer is None else self.base_layer.dequantize()

    def add(self, name: str, r: int, alpha: float, config: LoraConfig):
        q = self.base_layer
        A = nn.Linear(self.in_features, r, bias=False, **self.factory())
        B = nn.Linear(r, self.out_features, bias=False, **self.factory())
        s = config.scaling(r, alpha)
        if q is not None and config.init in ("pissa", "olora"):
            raise ValueError(f"{config.init} rewrites the base weight, which is 4-bit here; quantize after "
                             "initialising, or use LoftQ (qlora.apply_loftq) for a quantization-aware start")
        with torch.no_grad():
            if config.init == "default":
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
                nn.init.zeros_(B.weight)
            elif config.init == "gaussian":
                nn.init.normal_(A.weight, std=1 / r)
                nn.init.zeros_(B.weight)
            else:
                W0 = self.weight
                A0, B0 = _pissa(W0.float(), r, s) if config.init == "pissa" else _olora(W0.float(), r)
                A.weight.copy_(A0)
                B.weight.copy_(B0)
                W0.sub_((s * B0 @ A0).to(W0.dtype))  # W_res = W0 - s B0 A0: the model is unchanged
                self.initial[name] = (A.weight.detach().clone(), B.weight.detach().clone())
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = s
        if config.use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self._row_norm(name))

    def factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A (r, in), B (out, r))."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta(self, name: str) -> torch.Tensor:
        """s · B A (out, in)."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def _row_norm(self, name: str) -> torch.Tensor:
        """||W0 + s B A|| over each output row (out,), detached (DoRA §4.3)."""
        return torch.linalg.norm(self.base_weight() + self.delta(name).detach(), dim=1).detach()

    def forward(self, x):
        y = self._base_forward(x)
        for name in self.active:
            if name in self.merged:
                continue
            x_ = self.lora_dropout[name](x)
            if name not in self.lora_magnitude_vector:
                y = _LoRAProduct.apply(y, x_, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
                continue
            # DoRA: m / ||W0 + sBA|| (row norms) rescales the adapted weight's output
            lora = self.lora_B[name](self.lora_A[name](x_)) * self.scaling[name]  # (..., out)
            scale = self.lora_magnitude_vector[name] / self._row_norm(name)  # (out,)
            bias = self.bias if self.base_layer is None else self.base_layer.bias
            base = F.linear(x_, self.base_weight()) if x_ is not x else y - (0 if bias is None else bias)
            y = y + (scale - 1) * base + scale * lora
        return y

    @torch.no_grad()
    def merge(self, name: str):
        if name in self.merged:
            return
        if self.base_layer is not None:
            raise ValueError("the base is 4-bit and cannot take the adapter in place; use qlora.merge_4bit, which "
                             "merges into the dequantized weight and can re-quantize it")
        delta = self.delta(name)
        if name in self.lora_magnitude_vector:  # W <- (m / ||W0 + ΔW||) (W0 + ΔW), row-wise
            norm = self._row_norm(name)
            self.weight.copy_((self.lora_magnitude_vector[name] / norm)[:, None] * (self.weight + delta))
            self.merged[name] = norm
        else:
            self.weight.add_(delta.to(self.weight.dtype))
            self.merged[name] = None

    @torch.no_grad()
    def unmerge(self, name: str):
        if name not in self.merged:
            return
        norm = self.merged.pop(name)
        if norm is not None:
            self.weight.copy_(self.weight / (self.lora_magnitude_vector[name] / norm)[:, None] - self.delta(name))
        else:
            self.weight.sub_(self.delta(name).to(self.weight.dtype))

    def delete(self, name: str):
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)
        self.initial.pop(name, None)
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors under PEFT's file keys (relative to the module)."""
        state = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return state


def _pissa(W, r, s):
    """PiSSA: W = U S V^T; A = √S_r V_r^T / √s, B = U_r √S_r / √s, so s B A is W's best rank-r part."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
    Sr = S[:r] / s
    return torch.diag(Sr.sqrt()) @ Vh[:r], U[:, :r] @ torch.diag(Sr.sqrt())  # (r, in), (out, r)


def _olora(W, r):
    """OLoRA: W = Q R; B = Q_r (orthonormal columns), A = R_r, as PEFT (scaling applied to the residual)."""
    Q, R = torch.linalg.qr(W)  # Q (out, k), R (k, in)
    return R[:r].contiguous(), Q[:, :r].contiguous()


class LoRAEmbedding(AdapterLayer):
    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.weight = base.weight  # (V, C), frozen
        self.lora_embedding_A = nn.ParameterDict()  # name -> (r, V)
        self.lora_embedding_B = nn.ParameterDict()  # name -> (C, r)
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: dict[str, None] = {}

    def add(self, name: str, r: int, alpha: float, config: LoraConfig):
        if config.use_dora or config.init in ("pissa", "olora"):
            raise ValueError("LoRA on embeddings supports the default and gaussian inits without DoRA")
        w = self.weight
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, self.num_embeddings, dtype=w.dtype, device=w.device))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.embedding_dim, r, dtype=w.dtype, device=w.device))
        self.scaling[name] = config.scaling(r, alpha)

    def factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A (r, V), B (C, r))."""
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def delta(self, name: str) -> torch.Tensor:
        return self.scaling[name] * (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T  # (V, C)

    def forward(self, x):
        y = F.embedding(x, self.weight, self.padding_idx)
        for name in self.active:
            if name not in self.merged:
                after_A = F.embedding(x, self.lora_embedding_A[name].T, self.padding_idx)  # (..., r)
                y = y + (after_A @ self.lora_embedding_B[name].T) * self.scaling[name]  # (..., C)
        return y

    @torch.no_grad()
    def merge(self, name: str):
        if name not in self.merged:
            self.weight.add_(self.delta(name).to(self.weight.dtype))
            self.merged[name] = None

    @torch.no_grad()
    def unmerge(self, name: str):
        if name in self.merged:
            del self.merged[name]
            self.weight.sub_(self.delta(name).to(self.weight.dtype))

    def delete(self, name: str):
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        for d in (self.lora_embedding_A, self.lora_embedding_B):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_embedding_A)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}

    def base(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        emb.weight = self.weight
        return emb


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


# -- attaching adapters to a model -----------------------------------------------------------------

def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, targets="all-linear", dropout: float = 0.0,
               use_rslora: bool = False, use_dora: bool = False, init: str = "default", layers=None,
               modules_to_save=None, adapter_name: str = "default", rank_pattern=None, alpha_pattern=None,
               verbose: bool = True, config: LoraConfig | None = None) -> nn.Module:
    """Attach a LoRA adapter named `adapter_name`, make it the active one, and freeze everything else.

    Returns the model (changed in place). Prints the trainable parameter count when verbose.
    """
    config = config or LoraConfig(r=r, alpha=alpha, dropout=dropout, targets=targets, use_rslora=use_rslora,
                                  use_dora=use_dora, init=init, layers=layers, modules_to_save=modules_to_save,
                                  rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}))
    if adapter_name in getattr(model, "adapter_configs", {}):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    names = find_targets(model, config.targets, config.layers)
    names = [n for n in names if not (config.modules_to_save and n in config.modules_to_save)]
    if not names:
        raise ValueError(f"targets {config.targets!r} match no module; linear modules are named like "
                         f"{_example_names(model)}")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, (nn.Linear, Linear4bit)):
            module = LoRALinear(module)
        elif isinstance(module, nn.Embedding):
            module = LoRAEmbedding(module)
        elif not isinstance(module, (LoRALinear, LoRAEmbedding)):
            raise ValueError(f"module {name} is a {type(module).__name__}; LoRA targets nn.Linear or nn.Embedding")
        module.add(adapter_name, *config.rank_alpha(name), config)
        _replace(model, name, module)
    for name in config.modules_to_save or []:
        hits = [n for n, _ in model.named_modules() if n == name or n.endswith("." + name)]
        if not hits:
            raise ValueError(f"modules_to_save: no module named {name!r}")
        for hit in hits:
            module = model.get_submodule(hit)
            module = module if isinstance(module, TrainableCopy) else TrainableCopy(module)
            module.add(adapter_name)
            _replace(model, hit, module)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        trainable, total = count_parameters(model)
        print(f"LoRA '{adapter_name}': {len(names)} modules, trainable parameters {trainable:,} of {total:,} "
              f"({100 * trainable / total:.3f}%)")
    return model


def _example_names(model) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))


def merge_lora(model: nn.Module, names=None):
    """Fold the active (or named) adapters into the base weights: LoRA W0 <- W0 + s B A (DoRA: rescaled),
    and any other method that can merge (IA3); the others (prefixes, bottleneck adapters) refuse."""
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


def unmerge_lora(model: nn.Module):
    for _, layer in adapter_layers(model):
        for n in reversed(list(layer.merged)):  # last merged, first unmerged: undoes a product or a DoRA rescale
            layer.unmerge(n)


def _is_tied(model, weight) -> bool:
    return sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) > 1


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter layer by a plain module: merged first (merge=True) or discarded. A
    modules_to_save copy that is active replaces its original. Returns the plain model."""
    if merge:
        merge_lora(model)
    else:
        unmerge_lora(model)
    for name, layer in adapter_layers(model):
        if isinstance(layer, TrainableCopy) and merge and layer.active:
            _replace(model, name, layer.modules_to_save[layer.active[0]])
        else:
            _replace(model, name, layer.base())
    model.__dict__.pop("adapter_configs", None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every active adapter that can be folded into the base and return the plain model."""
    return unload(model, merge=True)


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], new_name: str,
                         combination: str = "cat"):
    """A new LoRA adapter combining existing ones, as PEFT's add_weighted_adapter.

    "cat": exact, ΔW = Σ w_i s_i B_i A_i, as one adapter of rank Σ r_i (w_i s_i A_i stacked, B_i
    stacked, s = 1). "linear": PEFT's approximation for equal ranks, with c_i = w_i s_i,
    A = Σ sign(c_i) √|c_i| A_i, B = Σ √|c_i| B_i, s = 1: it carries cross terms B_i A_j (i ≠ j), which
    is PEFT's definition, kept so that both give the same adapter.
    """
    configs = getattr(model, "adapter_configs", {})
    if missing := [a for a in adapters if a not in configs]:
        raise ValueError(f"no adapter named {missing}")
    if len(adapters) != len(weights):
        raise ValueError("adapters and weights must have the same length")
    if any(configs[a].use_dora for a in adapters):
        raise ValueError("weighted combinations of DoRA adapters are not supported")
    if combination not in ("cat", "linear"):
        raise ValueError(f"combination {combination!r} is not supported; supported: cat, linear")
    built = {}  # module name -> rank of the new adapter there
    for name, layer in adapter_layers(model):
        if not isinstance(layer, (LoRALinear, LoRAEmbedding)):
            continue
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
        if not present:
            continue
        As = [layer.factors(a)[0] for a, _ in present]
        Bs = [layer.factors(a)[1] for a, _ in present]
        c = [w * layer.scaling[a] for a, w in present]
        if combination == "cat":
            A = torch.cat([ci * Ai for ci, Ai in zip(c, As)], dim=0)  # (Σr, in)
            B = torch.cat(Bs, dim=1)  # (out, Σr)
        else:
            if len({a.shape[0] for a in As}) > 1:
                raise ValueError("combination 'linear' needs adapters of equal rank; use 'cat'")
            A = sum(math.copysign(math.sqrt(abs(ci)), ci) * Ai for ci, Ai in zip(c, As))
            B = sum(math.sqrt(abs(ci)) * Bi for ci, Bi in zip(c, Bs))
        r = built[name] = A.shape[0]
        layer.add(new_name, r, float(r), LoraConfig(r=r, alpha=float(r)))
        with torch.no_grad():
            for param, value in zip(layer.factors(new_name), (A, B)):
                param.copy_(value)
    # The new adapter lives on the union of its parts' modules: name them exactly in the file's config.
    r = max(built.values())
    configs[new_name] = LoraConfig(r=r, alpha=float(r), targets="|".join(re.escape(n) for n in built))
    for name, rk in built.items():
        if rk != r:  # per-module ranks differ: record them so the file says the truth
            configs[new_name].rank_pattern[re.escape(name)] = rk
            configs[new_name].alpha_pattern[re.escape(name)] = float(rk)


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0):
    """LoRA+ (Hayou et al., 2024, arXiv:2402.12354): B learns `ratio` times faster than A.

    Optimizer parameter groups for the trainable parameters: lora_B (and lora_embedding_B) at lr·ratio,
    everything else at lr; weight decay only on matrices (not on DoRA magnitudes or biases)."""
    groups = {"A": [], "B": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_B." in name or ".lora_embedding_B." in name:
            groups["B"].append(p)
        elif p.ndim < 2:
            groups["no_decay"].append(p)
        else:
            groups["A"].append(p)
    return [g for g in (
        {"params": groups["A"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["B"], "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": groups["no_decay"], "lr": lr, "weight_decay": 0.0},
    ) if g["params"]]

