"""LoRA's modules (the method, its options and its files are in lora.py; the paper is Hu et al., 2021):

    y = W0 x + b + s · B A dropout(x),      A: (r, in),  B: (out, r),  s = alpha / r   (rsLoRA: alpha / √r)
    DoRA:  y = (m / ||W0 + s B A||_row) (W0 x + s B A x) + b,   the norm detached (Liu et al., 2024, §4.3)
    Embedding:  y = E[x] + s · (A^T[x]) B^T,   A (r, V) zero,  B (C, r) normal  (as PEFT)

`LoRALinear` wraps an nn.Linear (W0 kept as its own `weight`, so base keys do not move) or a 4-bit
`Linear4bit` (QLoRA: held as `base_layer`, dequantized where W0 is needed). Several named adapters can
live in one module; `active` lists the ones applied. Adapter keys are PEFT's: `lora_A.<name>.weight`,
`lora_B.<name>.weight`, `lora_magnitude_vector.<name>`, `lora_embedding_A.<name>`.

Dimensions: r rank, in/out features, V vocabulary, C hidden.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import FusedExperts, swiglu
from ..precision import compute_dtype
from ..quant.linear4bit import Linear4bit
from .base import AdapterLayer, LinearAdapterLayer, layer_index

INITS = ("default", "gaussian", "pissa", "olora")


@dataclass
class LoraConfig:
    """Hyperparameters of one LoRA adapter (field names are minicustom's; lora.to_peft writes PEFT's)."""

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
    target_parameters: list[str] | None = None  # 3-D expert parameters ("mlp.experts.gate_up_proj"): LoRAExperts

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

    Under autocast (precision.py) the operands are cast to its dtype first, as autocast casts those of a
    built-in linear: the product and the output are bf16, the gradients of A and B come back in their own
    (fp32 master) dtype.
    """

    @staticmethod
    def forward(ctx, y, x, A, B, s: float):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2, A_, B_ = x.reshape(-1, x.shape[-1]).to(dtype), A.to(dtype), B.to(dtype)  # (N, in), (r, in), (out, r)
            xa = x2 @ A_.T  # (N, r)
            out = torch.addmm(y.reshape(-1, y.shape[-1]).to(dtype), xa, B_.T, alpha=s)  # (N, out)
        ctx.save_for_backward(x2, xa, A_, B_)
        ctx.s, ctx.x_shape, ctx.dtypes = s, x.shape, (y.dtype, x.dtype, A.dtype, B.dtype)
        return out.view(*y.shape)

    @staticmethod
    def backward(ctx, g):
        x2, xa, A, B = ctx.saved_tensors
        y_dtype, x_dtype, A_dtype, B_dtype = ctx.dtypes
        g2 = g.reshape(-1, g.shape[-1]).to(xa.dtype)  # (N, out)
        g_xa = (B.T @ g2.T).T * ctx.s  # (N, r) = s g B
        grad_x = (g_xa @ A).view(ctx.x_shape).to(x_dtype) if ctx.needs_input_grad[1] else None
        grad_A = (g_xa.T @ x2).to(A_dtype) if ctx.needs_input_grad[2] else None  # (r, in)
        grad_B = ((xa.T @ g2).T * ctx.s).to(B_dtype) if ctx.needs_input_grad[3] else None  # (out, r) = s g^T (x A^T)
        return g.to(y_dtype), grad_x, grad_A, grad_B, None


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
        """||W0 + s B A|| over each output row (out,), detached (DoRA §4.3); in the master weights' dtype even
        under autocast (a bf16 B A would round the norm)."""
        with torch.no_grad(), torch.autocast(self.lora_A[name].weight.device.type, enabled=False):
            return torch.linalg.norm(self.base_weight() + self.delta(name), dim=1)

    def forward(self, x):
        y = self.base_forward(x)
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

    def fold(self, W: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W (out, in) with adapter `name` folded in: W + s B A, or for DoRA (m / n)[:, None] (W + s B A),
        n the row norms of W + s B A (returned too, so that unmerge can undo the rescale)."""
        W = W + self.delta(name).to(W.dtype)
        if name not in self.lora_magnitude_vector:
            return W, None
        norm = torch.linalg.norm(W, dim=1)  # (out,)
        return (self.lora_magnitude_vector[name].to(W.dtype) / norm)[:, None] * W, norm

    @torch.no_grad()
    def set_factors(self, name: str, A: torch.Tensor, B: torch.Tensor):
        """Start adapter `name` from given factors, A (r, in) and B (out, r) (LoftQ's, say)."""
        self.lora_A[name].weight.copy_(A)
        self.lora_B[name].weight.copy_(B)

    @torch.no_grad()
    def merge(self, name: str):
        if name in self.merged:
            return
        if self.base_layer is not None:
            raise ValueError("the base is 4-bit and cannot take the adapter in place; use qlora.merge_4bit, which "
                             "merges into the dequantized weight and can re-quantize it")
        W, norm = self.fold(self.weight, name)
        self.weight.copy_(W)
        self.merged[name] = norm

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


def parameter_targets(model: nn.Module, wanted: list[str] | None, layers=None) -> list[tuple[str, list[str]]]:
    """(module name, the parameters named by `wanted`) for every fused-experts module, as PEFT's target_parameters
    selects them (full name, or ending in '.' + an entry). The parameters come in the module's own order, which
    is the order PEFT nests its wrappers in (the first innermost), whatever the order of `wanted`."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, (FusedExperts, LoRAExperts)) or (layers is not None and layer_index(name) not in layers):
            continue
        params = [p for p in LoRAExperts.PARAMS
                  if any(f"{name}.{p}" == w or f"{name}.{p}".endswith("." + w) for w in wanted or ())]
        if params:
            out.append((name, params))
    return out


class LoRAExperts(AdapterLayer):
    """LoRA on the 3-D expert parameters of `FusedExperts` (PEFT's target_parameters, its ParamWrapper): for
    each targeted parameter P (gate_up_proj (E, 2I, C), down_proj (E, C, I)) and each expert e,

        P[e] <- P[e] + s B_e A_e,      A_e (r, in),  B_e (out, r),  in/out as P[e] is applied (F.linear)

    kept as PEFT keeps them: A (E r, in), rows e r .. e r + r - 1 are A_e; B (out, r E), column j E + e is
    column j of B_e. A_e starts Kaiming-uniform, B_e at zero. An expert no token chose gets no gradient in
    that step; every expert has its own A_e, B_e. The parameters stay this module's own (keys do not move).
    Left out, as PEFT: dropout, DoRA, bias, and the other inits.
    """

    PARAMS = ("gate_up_proj", "down_proj")

    def __init__(self, base: FusedExperts):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act = base.gate_up_proj, base.down_proj, base.act
        self.E = base.gate_up_proj.shape[0]
        self.lora_A = nn.ModuleDict()  # adapter name -> {parameter name: A (E r, in)}
        self.lora_B = nn.ModuleDict()  # adapter name -> {parameter name: B (out, r E)}
        self.scaling: dict[str, float] = {}
        self.order: dict[str, list[str]] = {}  # adapter name -> its parameters, PEFT's innermost wrapper first
        self.active: list[str] = []
        self.merged: dict[str, None] = {}

    def shape(self, param: str) -> tuple[int, int]:
        """(out, in) of one expert's matrix of `param`."""
        return tuple(getattr(self, param).shape[1:])

    def add(self, name: str, params: list[str], r: int, alpha: float, config: LoraConfig):
        if config.use_dora or config.dropout or config.init not in ("default", "gaussian"):
            raise ValueError("LoRA on expert parameters (target_parameters) takes no DoRA, dropout or PiSSA/OLoRA "
                             "init, as in PEFT")
        w = self.gate_up_proj
        A, B = nn.ParameterDict(), nn.ParameterDict()
        for p in params:
            out, in_ = self.shape(p)
            A[p] = nn.Parameter(torch.empty(self.E * r, in_, device=w.device, dtype=w.dtype))
            B[p] = nn.Parameter(torch.zeros(out, r * self.E, device=w.device, dtype=w.dtype))
            with torch.no_grad():
                if config.init == "default":  # nn.Linear(in, r E)'s init, as PEFT's lora_A
                    nn.init.kaiming_uniform_(A[p], a=math.sqrt(5))
                else:
                    nn.init.normal_(A[p], std=1 / r)
        self.lora_A[name], self.lora_B[name] = A, B
        self.scaling[name], self.order[name] = config.scaling(r, alpha), list(params)

    def factors(self, name: str, param: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e (r, in), B_e (out, r)) of expert e."""
        A, B = self.lora_A[name][param], self.lora_B[name][param]
        r = A.shape[0] // self.E
        return A[e * r:(e + 1) * r], B[:, e::self.E]

    def delta(self, name: str, param: str) -> torch.Tensor:
        """s B_e A_e for every expert (E, out, in)."""
        return self.scaling[name] * torch.stack([B @ A for A, B in
                                                 (self.factors(name, param, e) for e in range(self.E))])

    def weight(self, param: str, e: int) -> torch.Tensor:
        W = getattr(self, param)[e]
        for name in self.active:
            if name not in self.merged and param in self.lora_A[name]:
                A, B = self.factors(name, param, e)
                W = W + self.scaling[name] * (B @ A)  # (out, in)
        return W

    def expert(self, e: int, x):
        return swiglu(x, self.weight("gate_up_proj", e), self.weight("down_proj", e), self.act)

    @torch.no_grad()
    def merge(self, name: str):
        if name not in self.merged:
            for p in self.order[name]:
                getattr(self, p).add_(self.delta(name, p).to(self.gate_up_proj.dtype))
            self.merged[name] = None

    @torch.no_grad()
    def unmerge(self, name: str):
        if name in self.merged:
            del self.merged[name]
            for p in self.order[name]:
                getattr(self, p).sub_(self.delta(name, p).to(self.gate_up_proj.dtype))

    def delete(self, name: str):
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        for d in (self.lora_A, self.lora_B):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)
        self.order.pop(name, None)
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT's file keys: the wrapper of the last parameter is outermost, each earlier one a base_layer deeper."""
        params, state = self.order[name], {}
        for i, p in enumerate(params):
            where = "base_layer." * (len(params) - 1 - i)
            state[f"{where}lora_A.weight"], state[f"{where}lora_B.weight"] = self.lora_A[name][p], self.lora_B[name][p]
        return state

    def base(self) -> FusedExperts:
        with torch.device("meta"):
            experts = FusedExperts(self.gate_up_proj.shape[2], self.down_proj.shape[2], self.E, self.act)
        experts.gate_up_proj, experts.down_proj = self.gate_up_proj, self.down_proj
        return experts
