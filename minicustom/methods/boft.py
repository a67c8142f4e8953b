"""BOFT: Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization (Liu et al., ICLR 2024,
arXiv:2311.06243), as PEFT's BOFT applies it to a linear.

A frozen linear W0 (out, in) keeps its weights and gets its input rotated by a learned orthogonal matrix R
(in, in) and its output scaled by a learned vector s (out,):

    y = s ⊙ (W0 Rᵀ x) + b,    R = M_m ⋯ M_2 M_1,    M_i = P_i diag(Q_i1, ..., Q_iD) P_iᵀ,
    Q = (I - S)(I + S)⁻¹,     S = (boft_R - boft_Rᵀ) / 2     (Cayley, per H×H block: orthogonal for any boft_R)

Each butterfly factor M_i is block diagonal, D blocks of H (D·H = in), conjugated by a fixed permutation
P_i that interleaves pieces of H/2 within runs of 2^(i-1) blocks, evens first (PEFT's block_butterfly_perm;
P_1 = I), so m factors mix 2^(m-1)·H inputs while each keeps D·H² parameters: m = 1 is plain OFT. boft_block_size H or
boft_block_num D is given (exactly one), the other is in / it; m = boft_n_butterfly_factor. A block count
that does not divide in, or m too large for it (D a multiple of 2^(m-1), H and D even when m > 1), is
refused for the module that has it.

PEFT's init (init_weights=True): boft_R = 0, so Q = I and R = I exactly, and s = 1: the model is unchanged
at step 0. init_weights=False draws boft_R ~ N(0, 0.1²) then s ~ N(1, 0.1²) (PEFT's testing switch).
boft_dropout p (PEFT's MultiplicativeDropoutLayer, training only): in one factor drawn at random,
int(p·D) blocks drawn at random are replaced by I, with PEFT's draws in PEFT's order (torch.randint, then
torch.randperm, on the global generator). Several named adapters active in one module compose: the later
rotation multiplies on the left, R = R_b R_a, and s = s_b ⊙ s_a. Merging folds the adapter into the weight,
W0 <- s ⊙ (W0 Rᵀ) (rows scaled); unmerging applies the inverse, W <- (W R) / s, with Rᵀ for R⁻¹ (R is
orthogonal up to the solve's rounding): W0 comes back within float error.

Which modules: PEFT takes LoRA's defaults per family (TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING is
a copy of LoRA's): q_proj, v_proj on every family here; PEFT has none for Phi-3 (ours: qkv_proj) and
Qwen3-MoE (ours: Qwen3's). Targets as in loha.py: a list of names, one regex (full match) or "all-linear",
and `layers` (layers_to_transform). The file keys are PEFT's: "base_model.model." + module name +
".boft_R" (m, D, H, H) and ".boft_s" (out, 1).

How PEFT computes it, and where we differ: PEFT builds boft_P as (m, in, in) permutation matrices and
multiplies by them; we keep the permutations as indices and gather, B[p][:, p] = P B Pᵀ, which is exact, so
the rotation is the same bit for bit (`permutation_matrices` gives PEFT's boft_P for the tests). The
forward follows PEFT's operation for operation: x R, the base linear (b added), then b taken off, the
output scaled by s and b added back; so on a linear with a bias (Qwen2's q/k/v) the identity at init holds
up to the rounding of (y - b) + b, and exactly without one. PEFT's optional CUDA extension (fbd_cuda, a
block-diagonal scatter) is torch.block_diag here. PEFT without that extension (every CPU) silently trains
with m = 1 whatever boft_n_butterfly_factor says, and writes boft_R as (1, D, H, H); we honour m
everywhere, so a folder with m > 1 loads in PEFT only where its extension builds (and a PEFT CPU folder
whose config says m > 1 is refused here, naming boft_R's shape).

Left out, which PEFT has: Conv2d targets, bias="all"/"boft_only" (only "none"), exclude_modules,
modules_to_save, layers_pattern, and folding into a 4-bit base. fan_in_fan_out is accepted and ignored on
nn.Linear, as PEFT does.

Dimensions: in/out features of the adapted linear, m butterfly factors, D blocks of size H (D·H = in).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..argtypes import COUNT, COUNT0, DROPOUT
from ..quant.linear4bit import Linear4bit
from .base import (
    LinearAdapterLayer,
    Method,
    Option,
    adapter_configs,
    find_targets,
    linear_like,
    plan_linears,
    register_config,
    report,
    set_adapter,
    targets_option,
)
from .peft_format import CONFIG_FILE, PREFIX, AdapterError, check_fields, match_keys, refuse_unsupported

__all__ = ["BOFTConfig", "BOFTLinear", "apply_boft", "to_peft", "load_peft", "blocks", "butterfly_perm", "cayley"]

# PEFT's TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING (LoRA's) for our families; phi3, qwen3_moe: ours.
DEFAULT_TARGETS = {"phi3": ["qkv_proj"]}
_QV = ["q_proj", "v_proj"]
KEYS = ("boft_R", "boft_s")


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass
class BOFTConfig:
    """Block size or number (exactly one non-zero), butterfly factors, dropout, and which linears rotate.
    targets None means PEFT's default for the model family, filled in by `resolve` when attached."""

    peft_type: ClassVar[str] = "BOFT"

    boft_block_size: int = 4  # H; PEFT's default
    boft_block_num: int = 0  # D; 0: in / H
    boft_n_butterfly_factor: int = 1  # m; 1 is OFT
    targets: list[str] | str | None = None  # names (suffix match), one regex (full match), "all-linear"
    boft_dropout: float = 0.0  # multiplicative dropout: blocks set to I while training
    init_weights: bool = True  # False: boft_R and s random (PEFT's testing switch)
    layers: list[int] | None = None  # only these decoder layers (PEFT's layers_to_transform)

    def __post_init__(self):
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets)
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        size, num, m = self.boft_block_size, self.boft_block_num, self.boft_n_butterfly_factor
        if not (_count(size) and _count(num)) or (size == 0) == (num == 0):
            raise ValueError(f"BOFT takes exactly one of boft_block_size and boft_block_num (a positive integer, "
                             f"the other 0), found boft_block_size={size!r}, boft_block_num={num!r}")
        if not _count(m) or m == 0:
            raise ValueError(f"boft_n_butterfly_factor must be a positive integer (1 is OFT), found {m!r}")
        p = self.boft_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"boft_dropout must be a number in [0, 1), found {p!r}")

    def resolve(self, model_type: str) -> BOFTConfig:
        targets = DEFAULT_TARGETS.get(model_type, _QV) if self.targets is None else self.targets
        return dc_replace(self, targets=list(targets) if isinstance(targets, list) else targets)


def blocks(in_features: int, config: BOFTConfig) -> tuple[int, int]:
    """(D, H) for a linear of `in_features`, or a ValueError saying which number does not fit (PEFT's
    checks in update_layer, with m as given)."""
    size, num, k = config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor - 1
    given = f"boft_block_num {num}" if num else f"boft_block_size {size}"
    if in_features % (num or size):
        raise ValueError(f"in_features {in_features} is not divisible by {given}")
    num, size = (num, in_features // num) if num else (in_features // size, size)
    if k and (num % 2**k or num % 2 or size % 2):
        raise ValueError(f"boft_n_butterfly_factor {k + 1} needs an even block size and a number of blocks that is "
                         f"even and a multiple of 2^{k} = {2**k}; in_features {in_features} with {given} gives "
                         f"{num} blocks of {size}")
    return num, size


def butterfly_perm(n: int, num: int, half: int, k: int) -> torch.Tensor:
    """PEFT's block_butterfly_perm(n, b=num, r=half, n_butterfly_factor=k): indices p with (P x) = x[p].
    Each run of n/num entries is cut into pieces of `half` and reordered evens first, then odds."""
    if k == 0:
        return torch.arange(n)
    size = n // num
    pieces = torch.arange(size).view(size // half, half)  # (pieces, half)
    order = torch.cat([pieces[0::2], pieces[1::2]]).flatten()  # (size,)
    return (torch.arange(0, n, size)[:, None] + order).flatten()  # (num, size) -> (n,)


def cayley(R: torch.Tensor) -> torch.Tensor:
    """Q = (I - S)(I + S)⁻¹, S = (R - Rᵀ)/2, for R (N, H, H): PEFT's cayley_batch, solved in fp32 at least
    (torch.eye's default dtype; linalg.solve has no bf16) and returned in R's dtype."""
    N, H, _ = R.shape
    S = 0.5 * (R - R.transpose(1, 2))  # (N, H, H), skew-symmetric
    eye = torch.eye(H, device=R.device, dtype=torch.float32).unsqueeze(0).expand(N, H, H)
    return torch.linalg.solve(eye + S, eye - S, left=False).to(R.dtype)  # X (I + S) = I - S


def multiplicative_dropout(Q: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's MultiplicativeDropoutLayer on Q (m, D, H, H): in one factor n ~ U{0..m-1}, int(p·D) blocks
    chosen by a random permutation become I; the same draws as PEFT's, in its order."""
    m, D, H, _ = Q.shape
    n = torch.randint(0, m, (1,)).item()
    k = int(p * D)
    mask = torch.cat([torch.ones(k, device=Q.device), torch.zeros(D - k, device=Q.device)])
    mask = mask[torch.randperm(D)].view(1, D, 1, 1)
    full = torch.zeros(m, D, 1, 1, device=Q.device)
    full[n] = mask
    eye = torch.eye(H, device=Q.device).repeat(m, D, 1, 1)  # (m, D, H, H)
    return (1 - full) * Q + full * eye


class BOFTLinear(LinearAdapterLayer):
    """BOFT on an nn.Linear (W0 shared as `weight`, b as `bias`, so base keys do not move) or on a 4-bit
    `Linear4bit` (held as `base_layer`; its adapter runs, merging into it is refused)."""

    def __init__(self, base: nn.Linear | Linear4bit):
        super().__init__()
        self.hold(base)
        self.boft_R = nn.ParameterDict()  # name -> (m, D, H, H)
        self.boft_s = nn.ParameterDict()  # name -> (out, 1)
        self.boft_perm: dict[str, torch.Tensor] = {}  # name -> (m, in) indices: P_i as a gather
        self.boft_dropout: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: dict[str, None] = {}

    def add(self, name: str, config: BOFTConfig):
        num, size = blocks(self.in_features, config)
        k = config.boft_n_butterfly_factor - 1
        R = torch.zeros(k + 1, num, size, size, **self.factory())
        s = torch.ones(self.out_features, 1, **self.factory())
        if not config.init_weights:  # PEFT's order of draws: boft_R, then boft_s
            nn.init.normal_(R, mean=0.0, std=0.1)
            nn.init.normal_(s, mean=1.0, std=0.1)
        self.boft_R[name], self.boft_s[name] = nn.Parameter(R), nn.Parameter(s)
        self.boft_perm[name] = torch.stack([butterfly_perm(self.in_features, num // 2**i, size // 2, k)
                                            for i in range(k + 1)])  # (m, in)
        self.boft_dropout[name] = config.boft_dropout

    def permutation_matrices(self, name: str) -> torch.Tensor:
        """PEFT's boft_P (m, in, in): P_i[j, p_i[j]] = 1."""
        perm = self.boft_perm[name]
        return F.one_hot(perm, self.in_features).float()  # (m, in, in)

    def rotation(self, name: str, dtype: torch.dtype | None = None, dropout: bool = False) -> torch.Tensor:
        """R = M_m ⋯ M_1 (in, in), M_i = P_i blockdiag(Q_i) P_iᵀ; the blocks are cast to `dtype` before the
        products (PEFT's forward casts to x's dtype; its merge keeps R's). dropout: the forward's
        multiplicative dropout (training only; merging never drops)."""
        R = self.boft_R[name]
        m, D, H, _ = R.shape
        Q = cayley(R.view(m * D, H, H)).view(m, D, H, H)  # (m·D, H, H) -> (m, D, H, H)
        if dropout and self.boft_dropout[name] > 0:
            Q = multiplicative_dropout(Q, self.boft_dropout[name])
        perm = self.boft_perm[name].to(R.device)
        rot = None
        for i in range(m):
            B = torch.block_diag(*Q[i].unbind()).to(dtype or Q.dtype)  # (in, in)
            M = B[perm[i]][:, perm[i]]  # P B Pᵀ: rows and columns permuted, exactly
            rot = M if rot is None else M @ rot  # (in, in) @ (in, in)
        return rot

    def forward(self, x):
        rot, s = None, None
        for name in self.active:
            if name not in self.merged:
                M, s_ = self.rotation(name, x.dtype, dropout=self.training), self.boft_s[name]
                rot, s = (M, s_) if rot is None else (M @ rot, s_ * s)  # later adapters apply after
        if rot is None:
            return self.base_forward(x)
        x_rot = x @ rot.to(x.dtype)  # (B, T, in) @ (in, in) -> (B, T, in): Rᵀ x per token
        y = self.base_forward(x_rot)  # (B, T, out), b added
        b = self.bias if self.base_layer is None else self.base_layer.bias
        if b is None:
            return (y * s.squeeze(-1)).to(x.dtype)
        return ((y - b) * s.squeeze(-1) + b).to(x.dtype)  # PEFT's order: b off, scale, b back

    def _refuse_4bit(self):
        if self.base_layer is not None:
            raise ValueError("the base is 4-bit and cannot take BOFT's rotation in place (qlora.merge_4bit folds LoRA "
                             "only); keep the adapter unmerged, or load the base in full precision to merge")

    @torch.no_grad()
    def merge(self, name: str):
        """W0 <- s ⊙ (W0 Rᵀ), computed as PEFT does: (R W0ᵀ)ᵀ · s."""
        if name in self.merged:
            return
        self._refuse_4bit()
        rot, s = self.rotation(name), self.boft_s[name]
        W = (rot @ self.weight.to(rot.dtype).T).T * s  # (in, in) @ (in, out) -> (out, in), rows scaled
        self.weight.copy_(W)
        self.merged[name] = None

    @torch.no_grad()
    def unmerge(self, name: str):
        """W <- (W R) / s, PEFT's inverse: Rᵀ for R⁻¹ and 1/s."""
        if name in self.merged:
            del self.merged[name]
            rot, s = self.rotation(name), self.boft_s[name]
            W = (rot.T @ self.weight.to(rot.dtype).T).T  # (in, in) @ (in, out) -> (out, in)
            self.weight.copy_(W * (1 / s))

    def delete(self, name: str):
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        for d in (self.boft_R, self.boft_s, self.boft_perm, self.boft_dropout):
            if name in d:
                del d[name]
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.boft_R)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"boft_R": self.boft_R[name], "boft_s": self.boft_s[name]}

    def extra_repr(self) -> str:
        shapes = {n: tuple(r.shape) for n, r in self.boft_R.items()}
        return f"in_features={self.in_features}, out_features={self.out_features}, boft_R (m, D, H, H)={shapes}"


# -- attaching adapters to a model -----------------------------------------------------------------

def _plan(model: nn.Module, config: BOFTConfig) -> tuple[list[str], list[str]]:
    """plan_linears' ([names of the targeted linears], [problems]), less the linears the blocks do not fit
    (a problem each); changes nothing."""
    linears, problems = plan_linears(model, config, BOFTLinear, "BOFT")
    plan = []
    for name in linears:
        try:
            blocks(model.get_submodule(name).in_features, config)
            plan.append(name)
        except ValueError as e:
            problems.append(f"{name}: {e}")
    return plan, problems


def _linear_names(model: nn.Module) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if linear_like(m)}))


def _attach(model: nn.Module, plan: list[str], adapter_name: str, config: BOFTConfig) -> dict[str, BOFTLinear]:
    layers = {}
    for name in plan:
        module = model.get_submodule(name)
        if not isinstance(module, BOFTLinear):
            module = BOFTLinear(module)
            model.set_submodule(name, module)
        module.add(adapter_name, config)
        layers[name] = module
    return layers


def apply_boft(model: nn.Module, boft_block_size: int | None = None, boft_block_num: int = 0,
               boft_n_butterfly_factor: int = 1, targets=None, boft_dropout: float = 0.0, init_weights: bool = True,
               layers=None, adapter_name: str = "default", verbose: bool = True,
               config: BOFTConfig | None = None) -> nn.Module:
    """Attach a BOFT adapter named `adapter_name` (R = I and s = 1 unless init_weights=False), make it the
    active one, and freeze everything else. boft_block_size None: PEFT's 4, or 0 when boft_block_num is
    given. targets None: PEFT's defaults for the family (q_proj, v_proj). Every targeted linear must fit the
    blocks; checked before the model changes. Returns the model (changed in place); prints the trainable
    parameter count when verbose."""
    if boft_block_size is None:
        boft_block_size = 0 if boft_block_num else 4
    config = (config or BOFTConfig(boft_block_size=boft_block_size, boft_block_num=boft_block_num,
                                   boft_n_butterfly_factor=boft_n_butterfly_factor, targets=targets,
                                   boft_dropout=boft_dropout, init_weights=init_weights, layers=layers)
              ).resolve(model.config.model_type)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    plan, problems = _plan(model, config)
    if isinstance(config.targets, list):
        problems += [f"target {t!r} matches no module" for t in config.targets
                     if not find_targets(model, [t], config.layers)]
    if not plan and not problems:
        problems.append(f"targets {config.targets!r} match no module")
    if problems:  # one line: the first problem, and how many more
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"cannot attach BOFT: {problems[0]}{more}; linear modules here are named "
                         f"{_linear_names(model)}")
    _attach(model, plan, adapter_name, config)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        blocks_ = f"boft_block_num={config.boft_block_num}" if config.boft_block_num else \
            f"boft_block_size={config.boft_block_size}"
        report(model, f"BOFT '{adapter_name}': {len(plan)} modules, {blocks_}, "
                      f"boft_n_butterfly_factor={config.boft_n_butterfly_factor}")
    return model


# -- PEFT adapter folders (the registry dispatches here on peft_type "BOFT") ------------------------------

# PEFT options minicustom does not implement: (field, the value that means "off").
_UNSUPPORTED = (("bias", "none"), ("exclude_modules", None), ("modules_to_save", None), ("layers_pattern", None))
_FIELDS = {"boft_n_butterfly_factor": "positive int", "boft_dropout": "dropout", "target_modules": "names",
           "init_weights": "bool", "layers_to_transform": "layers", "fan_in_fan_out": "bool", "bias": "str",
           "exclude_modules": "names", "modules_to_save": "name list"}


def to_peft(model: nn.Module, adapter_name: str):
    """(adapter_config.json as PEFT writes it for BOFT, tensors, no extra files). Merged or not, boft_R and
    boft_s are what is saved."""
    config = adapter_configs(model)[adapter_name]
    state = {f"{PREFIX}{name}.{k}": t for name, layer in model.named_modules()
             if isinstance(layer, BOFTLinear) and adapter_name in layer.adapters
             for k, t in layer.adapter_state(adapter_name).items()}
    return {
        "peft_type": "BOFT", "task_type": "CAUSAL_LM", "boft_block_size": config.boft_block_size,
        "boft_block_num": config.boft_block_num, "boft_n_butterfly_factor": config.boft_n_butterfly_factor,
        "boft_dropout": config.boft_dropout, "target_modules": config.targets, "exclude_modules": None,
        "fan_in_fan_out": False, "bias": "none", "init_weights": config.init_weights,
        "layers_to_transform": config.layers, "layers_pattern": None, "modules_to_save": None,
        "inference_mode": True, "auto_mapping": None, "base_model_name_or_path": None, "revision": None,
    }, state, {}


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Attach PEFT's BOFT folder: every targeted linear must fit the blocks and have boft_R and boft_s of
    the right shapes, and every key must belong to a targeted linear; all checked before the model changes."""
    where = path / CONFIG_FILE
    check_fields(peft, where, _FIELDS)
    for key in ("boft_block_size", "boft_block_num"):
        if peft.get(key) is not None and not _count(peft[key]):
            raise AdapterError(f"{where}: field {key!r} must be a non-negative integer, found {peft[key]!r}")
    refuse_unsupported(peft, where, _UNSUPPORTED, "BOFT")
    try:
        config = BOFTConfig(
            boft_block_size=4 if peft.get("boft_block_size") is None else peft["boft_block_size"],
            boft_block_num=peft.get("boft_block_num") or 0,
            boft_n_butterfly_factor=peft.get("boft_n_butterfly_factor") or 1, targets=peft.get("target_modules"),
            boft_dropout=peft.get("boft_dropout") or 0.0, init_weights=peft.get("init_weights") is not False,
            layers=peft.get("layers_to_transform")).resolve(model.config.model_type)
    except ValueError as e:
        raise AdapterError(f"{where}: {e}") from None
    plan, problems = _plan(model, config)
    if problems or not plan:
        raise AdapterError(f"{where}: target_modules {config.targets!r}: " + (
            "; ".join(problems) or "select no module of this model"))
    modules = dict(model.named_modules())
    m = config.boft_n_butterfly_factor
    shapes = {n: blocks(modules[n].in_features, config) for n in plan}  # (D, H)
    expected = {"boft_R": {n: (m, d, h, h) for n, (d, h) in shapes.items()},
                "boft_s": {n: (modules[n].out_features, 1) for n in plan}}
    note = {"boft_R": lambda shape: " (boft_n_butterfly_factor, blocks, block size, block size)",
            "boft_s": lambda shape: ""}
    found = {}
    for key in KEYS:  # one key per module and name: match each name's keys on their own
        mine = {k: t for k, t in tensors.items() if k.endswith("." + key) or not k.endswith(tuple("." + g for g in KEYS))}
        found[key] = match_keys(path, mine, "." + key, expected[key], modules, "BOFT", "linear", config.targets,
                                shape_note=note[key])

    # Checked: now change the model.
    layers = _attach(model, plan, adapter_name, config)
    with torch.no_grad():
        for key, by_name in found.items():
            for name, t in by_name.items():
                getattr(layers[name], key)[adapter_name].copy_(t)
    register_config(model, adapter_name, config)


def _apply(model, boft_block_size=None, boft_block_num=0, boft_n_butterfly_factor=1, boft_dropout=0.0, targets=None):
    return apply_boft(model, boft_block_size=boft_block_size, boft_block_num=boft_block_num,
                      boft_n_butterfly_factor=boft_n_butterfly_factor, boft_dropout=boft_dropout, targets=targets)


BOFT = Method("boft", _apply, "BOFT: a learned butterfly-orthogonal rotation of each frozen linear's input, and a "
                              "scale of its output", lr=1e-3, mergeable=True, peft_type="BOFT", options=(
                  Option("boft_block_size", None, "BOFT block size H (default 4, or in / --boft-block-num when "
                                                  "that is given; exactly one of the two)", type=COUNT0),
                  Option("boft_block_num", 0, "BOFT number of blocks D per linear (0: in / --boft-block-size)",
                         type=COUNT0),
                  Option("boft_n_butterfly_factor", 1, "BOFT butterfly factors m (1 is OFT)", type=COUNT),
                  Option("boft_dropout", 0.0, "BOFT multiplicative dropout: the fraction of one factor's blocks "
                                              "set to the identity at each training forward", type=DROPOUT),
                  Option("targets", None, "modules to adapt: all-linear, or names separated by commas (BOFT "
                                          "without it: PEFT's for the family, q_proj,v_proj)", type=targets_option)),
              to_peft=to_peft, load_peft=load_peft)

