"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang, Chen, Bukharin, Karampatziakis,
He, Cheng, Chen and Zhao, ICLR 2023, arXiv:2303.10512), as PEFT's ADALORA implements it.

A frozen linear W0 (out, in) gets an update in the form of a singular value decomposition whose singular values
are pruned during training to a total rank budget:

    y = W0 x + b + ΔW x,    ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5)
    A: (r, in) right singular vectors,  E: (r, 1) singular values (one per row of A),  B: (out, r) left ones

(the paper's P Λ Q is B, E, A), with r = init_r, scaling = alpha (PEFT's lora_alpha) and ranknum = init_r,
so ΔW's scale is alpha / init_r; ranknum is the rank the layer was made with, kept when pruned triplets are cut
from a saved file, so that ΔW does not change.

Training adds, once a step, R = orth_reg_weight · the mean over the A and B of every adapted layer of
‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (exactly what AdaLoraModel.forward adds to the loss: A and B stay near-orthogonal,
so E carries the magnitudes), and after each optimizer step, before zero_grad, the RankAllocator updates for
every entry p of A, E and B

    I = |p ⊙ ∇p|  (sensitivity),   Ī <- β1 Ī + (1 − β1) I,   U <- β2 U + (1 − β2) |I − Ī|  (uncertainty)
    score of triplet i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki),   s = Ī ⊙ U

against a budget of kept triplets over the n adapted layers: b = init_r·n up to step tinit, then the cubic
    b(t) = int((init_r·n − target_r·n) (1 − (t − tinit) / (T − tfinal − tinit))³ + target_r·n),   T = total_step;
every deltaT steps the triplets scoring at most the (init_r·n − b(t))-th smallest score get E_i = 0; at
t = T − tfinal the mask is fixed at b = target_r·n (and the EMAs reset), and every later step reapplies it.
t counts the steps taken, 1 to T (the loop's after_step; a 0-based count would never fix the mask when
tfinal = 0), and the trainer sets total_step to the run's length when it is not given. The mask is PEFT's
rank_pattern, saved in adapter_config.json as {"<module>.lora_E": [kept, ...]}, and the pruned triplets are cut
from the saved tensors, as PEFT does, so PEFT loads a pruned adapter (and minicustom loads PEFT's).

PEFT's init (init_lora_weights=True): A, E, B and ranknum drawn by randn in that order, then E = 0 and A, B
~ N(0, 0.02²), the same draws as PEFT's (one seed, one adapter): E = 0 makes ΔW = 0 exactly, the identity at
step 0; init_weights=False keeps the N(0, 1) draws. Merging folds ΔW into the weight; unmerging subtracts it.

Which modules: PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING, q_proj and v_proj for Llama,
Qwen2/3 and Gemma 2/3; PEFT has none for Mistral, Mixtral and Qwen3-MoE (ours: q_proj, v_proj) or Phi-3 (ours:
qkv_proj). Targets and layers select as in loha.py. File keys: "base_model.model." + module name + ".lora_A",
".lora_E", ".lora_B" (PEFT's ParameterDicts: no ".weight"); ranknum is not saved.

Left out, which PEFT has: lora_dropout (only 0), Conv2d/Conv1D targets and fan_in_fan_out, bias other than
"none", modules_to_save, exclude_modules, layers_pattern, alpha_pattern, DeepSpeed's gathered gradients and
folding into a 4-bit base (the adapter runs on one). Refused before training: target_r >= init_r (PEFT fails
mid-run, its kthvalue gets k <= 0) and allocating again the ranks of an adapter loaded pruned (its init_r-long
rank_pattern no longer fits the cut tensors). PEFT trains one AdaLoRA adapter at a time; here each trained one
gets its own allocator.

Dimensions: in/out features of the adapted linear, r its rank (init_r, or what a pruned file keeps), n layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..argtypes import COUNT, COUNT0, NONNEGATIVE, POSITIVE
from ..quant.linear4bit import Linear4bit
from .base import (
    LinearAdapterLayer,
    Method,
    Option,
    adapter_configs,
    plan_linears,
    plan_or_refuse,
    register_config,
    report,
    set_adapter,
    targets_option,
)
from .peft_format import CONFIG_FILE, PREFIX, AdapterError, check_fields, match_keys, refuse_unsupported

__all__ = ["AdaLoraConfig", "AdaLoraLinear", "RankAllocator", "apply_adalora", "to_peft", "load_peft"]

# PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING for our families; phi3 (and the q_proj, v_proj of
# mistral, mixtral, qwen3_moe, which PEFT does not list): ours.
DEFAULT_TARGETS = {"phi3": ["qkv_proj"]}
_QV = ["q_proj", "v_proj"]
FACTORS = ("lora_A", "lora_E", "lora_B")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class AdaLoraConfig:
    """The SVD adapter's ranks, alpha, targets and the rank schedule. targets None: PEFT's default for the family
    (filled in by `resolve`); total_step None: the trainer's run length (filled in when training starts)."""

    peft_type: ClassVar[str] = "ADALORA"

    init_r: int = 12
    target_r: int = 8  # the average rank left after pruning
    alpha: float = 8  # scaling = alpha (PEFT's lora_alpha; alpha <= 0: the layer's rank)
    targets: list[str] | str | None = None
    tinit: int = 0  # steps before pruning starts
    tfinal: int = 0  # steps after the mask is fixed
    delta_t: int = 1  # PEFT's deltaT: steps between two maskings
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    init_weights: bool = True  # False: A, E, B ~ N(0, 1), so ΔW != 0 at init (PEFT's testing switch)
    layers: list[int] | None = None  # only these decoder layers (PEFT's layers_to_transform)
    rank_pattern: dict[str, list[bool]] | None = None  # "<module>.lora_E" -> which triplets are kept

    def __post_init__(self):
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets)
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        checks = {  # field -> (holds, what it must be)
            **{f: (_is_int(getattr(self, f)) and getattr(self, f) > 0, "a positive integer")
               for f in ("init_r", "target_r", "delta_t")},
            **{f: (_is_int(getattr(self, f)) and getattr(self, f) >= 0, "an integer >= 0") for f in ("tinit", "tfinal")},
            "total_step": (self.total_step is None or _is_int(self.total_step) and self.total_step > 0,
                           "a positive integer, or None (the run's length)"),
            **{f: (isinstance(getattr(self, f), (int, float)) and 0 < getattr(self, f) < 1, "in (0, 1)")
               for f in ("beta1", "beta2")},
            "orth_reg_weight": (isinstance(self.orth_reg_weight, (int, float)) and self.orth_reg_weight >= 0
                                and math.isfinite(self.orth_reg_weight), "a finite number >= 0"),
            "alpha": (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha), "a finite number"),
        }
        for name, (holds, expected) in checks.items():
            if not holds:
                raise ValueError(f"AdaLoRA option {name} must be {expected}, found {getattr(self, name)!r}")
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int):
        """PEFT's check: a pruning phase must remain between tinit and total_step - tfinal."""
        if self.tinit >= total_step - self.tfinal:
            raise ValueError(f"AdaLoRA's schedule leaves no step to prune ranks in: tinit {self.tinit} + tfinal "
                             f"{self.tfinal} >= total_step {total_step}; lower tinit/tfinal or train longer")

    def check_pruning(self):
        """The budget goes from init_r·n down to target_r·n (PEFT fails mid-run otherwise, in kthvalue)."""
        if self.target_r >= self.init_r:
            raise ValueError(f"AdaLoRA prunes from init_r down to target_r: target_r {self.target_r} must be "
                             f"below init_r {self.init_r}")

    def resolve(self, model_type: str) -> AdaLoraConfig:
        targets = DEFAULT_TARGETS.get(model_type, _QV) if self.targets is None else self.targets
        return dc_replace(self, targets=list(targets) if isinstance(targets, list) else targets)

    def training_hooks(self, model: nn.Module, name: str, total_steps: int) -> RankAllocator | None:
        """The trainer's seam (train/loop.py, method_hooks), called before the first step: total_step None
        becomes the run's length, a schedule without a pruning phase is refused, and the adapter, if it
        trains, gets its RankAllocator (the regularizer, the step-end allocation, the checkpointed state)."""
        params = [p for layer in _layers(model, name).values() for p in layer.adapter_state(name).values()]
        if not params or not all(p.requires_grad for p in params):
            return None  # a frozen AdaLoRA adapter (a reference, a second adapter) allocates nothing
        if any(layer.lora_A[name].shape[0] != self.init_r for layer in _layers(model, name).values()):
            raise ValueError(f"AdaLoRA adapter {name!r} was saved pruned (its rank_pattern cut triplets): its ranks "
                             "cannot be allocated again; train a new adapter, or merge this one first")
        total = self.total_step if self.total_step is not None else total_steps
        self.check_schedule(total)
        self.check_pruning()
        self.total_step = total
        return RankAllocator(model, self, name)


class AdaLoraLinear(LinearAdapterLayer):
    """AdaLoRA on an nn.Linear (W0 shared as `weight`, b as `bias`, so base keys do not move) or on a 4-bit
    `Linear4bit` (held as `base_layer`; its adapter runs, merging into it is refused)."""

    def __init__(self, base: nn.Linear | Linear4bit):
        super().__init__()
        self.hold(base)
        self.lora_A = nn.ParameterDict()  # name -> A (r, in)
        self.lora_E = nn.ParameterDict()  # name -> E (r, 1)
        self.lora_B = nn.ParameterDict()  # name -> B (out, r)
        self.scaling: dict[str, float] = {}  # name -> alpha
        self.ranknum: dict[str, float] = {}  # name -> the rank ΔW is divided by (init_r)
        self.active: list[str] = []
        self.merged: dict[str, None] = {}

    def add(self, name: str, r: int, alpha: float, init_weights: bool = True, ranknum: int | None = None):
        A, E, B = torch.randn(r, self.in_features), torch.randn(r, 1), torch.randn(self.out_features, r)
        torch.randn(1)  # PEFT's ranknum placeholder: one more draw, so that the next layer's draws stay PEFT's
        if init_weights:  # PEFT's reset_lora_parameters
            nn.init.zeros_(E)  # ΔW = B (A ⊙ 0) = 0: the identity at init
            nn.init.normal_(A, mean=0.0, std=0.02)
            nn.init.normal_(B, mean=0.0, std=0.02)
        for f, t in zip(FACTORS, (A, E, B)):
            getattr(self, f)[name] = nn.Parameter(t.to(**self.factory()))
        self.scaling[name] = alpha if alpha > 0 else float(r)
        self.ranknum[name] = float(r if ranknum is None else ranknum)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5): (out, r) @ (r, in) -> (out, in)."""
        A, E, B = (getattr(self, f)[name] for f in FACTORS)
        return B @ (A * E) * self.scaling[name] / (self.ranknum[name] + 1e-5)

    def forward(self, x):
        y = self.base_forward(x)
        for name in self.active:
            if name not in self.merged:
                A, E, B = (getattr(self, f)[name] for f in FACTORS)
                h = x.to(A.dtype) @ (A * E).T  # (B, T, in) @ (in, r) -> (B, T, r)
                y = y + (h @ B.T) * self.scaling[name] / (self.ranknum[name] + 1e-5)  # (B, T, r) @ (r, out)
        return y.to(x.dtype)

    @torch.no_grad()
    def merge(self, name: str):
        if name in self.merged:
            return
        if self.base_layer is not None:
            raise ValueError("the base is 4-bit and cannot take AdaLoRA's ΔW in place (qlora.merge_4bit folds LoRA "
                             "only); keep the adapter unmerged, or load the base in full precision to merge")
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
        for f in FACTORS:
            if name in getattr(self, f):
                del getattr(self, f)[name]
        self.scaling.pop(name, None)
        self.ranknum.pop(name, None)
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f)[name] for f in FACTORS}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapters}"


def _layers(model: nn.Module, name: str) -> dict[str, AdaLoraLinear]:
    """module name -> AdaLoRA layer carrying adapter `name`, in the model's order (PEFT's sums run in it)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLinear) and name in m.adapters}


# -- the rank allocation (PEFT's RankAllocator and AdaLoraModel.update_and_allocate) ---------------------------

class RankAllocator:
    """The training-time half of AdaLoRA for one adapter, as the trainer's hook: `regularizer()` (added to each
    step's loss), `after_step(t)` (sensitivities, budget, masks), and `state()` / `load_state()` (the EMAs and the
    mask, kept in checkpoints so that a resumed run allocates as the uninterrupted one)."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, name: str):
        self.config, self.name = config, name
        self.layers = _layers(model, name)
        self.init_bgt = sum(m.lora_A[name].shape[0] for m in self.layers.values())
        self.target_bgt = config.target_r * len(self.layers)
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}  # "<module>.<factor>" -> Ī, shaped like the factor
        self.exp_avg_unc: dict[str, torch.Tensor] = {}  # "<module>.<factor>" -> U

    def params(self):
        for n, layer in self.layers.items():
            for f in FACTORS:
                yield f"{n}.{f}", getattr(layer, f)[self.name]

    def regularizer(self) -> torch.Tensor:
        """orth_reg_weight · mean of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F over the layers, summed in PEFT's order."""
        total, n = 0, 0
        for layer in self.layers.values():
            for f in ("lora_A", "lora_B"):
                p = getattr(layer, f)[self.name]
                cov = p @ p.T if f == "lora_A" else p.T @ p  # (r, r)
                eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
                total, n = total + torch.norm(cov - eye, p="fro"), n + 1
        return self.config.orth_reg_weight * (total / n)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(the budget of kept triplets at `step`, whether to mask at it)."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt), step % c.delta_t == 0

    @torch.no_grad()
    def update_ipt(self):
        b1, b2 = self.config.beta1, self.config.beta2
        for key, p in self.params():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)  # no gradient: no sensitivity
            ipt = (p * grad).abs().detach()
            avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
            unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
            self.exp_avg_ipt[key] = avg = b1 * avg + (1 - b1) * ipt
            self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def scores(self) -> dict[str, torch.Tensor]:
        """module -> each triplet's score (r, 1): s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)."""
        out = {}
        for n, layer in self.layers.items():
            s = {}
            for f in FACTORS:
                zero = torch.zeros_like(getattr(layer, f)[self.name])
                s[f] = self.exp_avg_ipt.get(f"{n}.{f}", zero) * self.exp_avg_unc.get(f"{n}.{f}", zero)
            a = torch.mean(s["lora_A"], dim=1, keepdim=True)  # (r, in) -> (r, 1)
            b = torch.mean(s["lora_B"], dim=0, keepdim=False).view(-1, 1)  # (out, r) -> (r, 1)
            out[n] = (s["lora_E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1).view(-1)).view(-1, 1)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """E_i := 0 for every triplet scoring at most the (init_bgt − budget)-th smallest score; the rank pattern."""
        scores = self.scores()
        threshold = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=self.init_bgt - budget)[0].item()
        pattern = {}
        for n, layer in self.layers.items():
            drop = scores[n] <= threshold  # (r, 1)
            layer.lora_E[self.name].masked_fill_(drop, 0.0)
            pattern[f"{n}.lora_E"] = (~drop).view(-1).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self):
        for n, layer in self.layers.items():
            E = layer.lora_E[self.name]
            keep = torch.tensor(self.config.rank_pattern[f"{n}.lora_E"], device=E.device).view(-1, 1)
            E.masked_fill_(~keep, 0.0)

    def after_step(self, step: int):
        """After optimizer step `step` (1-based), before zero_grad: AdaLoraModel.update_and_allocate(step)."""
        c = self.config
        end = c.total_step - c.tfinal
        if step < end:
            self.update_ipt()
            budget, mask = self.budget_schedule(step)
            if mask:
                c.rank_pattern = self.mask_to_budget(budget)
        elif step == end:  # the final mask, at the target budget; the EMAs are done with
            c.rank_pattern = self.mask_to_budget(self.budget_schedule(step)[0])
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        elif c.rank_pattern is not None:
            self.mask_using_rank_pattern()

    def state(self) -> dict[str, torch.Tensor]:
        out = {**{f"ipt\x1f{k}": t for k, t in self.exp_avg_ipt.items()},
               **{f"unc\x1f{k}": t for k, t in self.exp_avg_unc.items()}}
        for key, keep in (self.config.rank_pattern or {}).items():
            out[f"mask\x1f{key}"] = torch.tensor(keep, dtype=torch.bool)
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]):
        device = {k: p.device for k, p in self.params()}
        self.exp_avg_ipt = {k.split("\x1f")[1]: t.to(device[k.split("\x1f")[1]]) for k, t in tensors.items()
                            if k.startswith("ipt\x1f")}
        self.exp_avg_unc = {k.split("\x1f")[1]: t.to(device[k.split("\x1f")[1]]) for k, t in tensors.items()
                            if k.startswith("unc\x1f")}
        masks = {k.split("\x1f")[1]: t.tolist() for k, t in tensors.items() if k.startswith("mask\x1f")}
        self.config.rank_pattern = masks or None


# -- attaching adapters to a model -----------------------------------------------------------------

def _attach(model: nn.Module, plan: list[str], adapter_name: str, config: AdaLoraConfig,
            ranks: dict[str, int] | None = None) -> dict[str, AdaLoraLinear]:
    layers = {}
    for name in plan:
        module = model.get_submodule(name)
        if not isinstance(module, AdaLoraLinear):
            module = AdaLoraLinear(module)
            model.set_submodule(name, module)
        module.add(adapter_name, (ranks or {}).get(name, config.init_r), config.alpha, config.init_weights,
                   ranknum=config.init_r)
        layers[name] = module
    return layers


def apply_adalora(model: nn.Module, init_r: int = 12, target_r: int = 8, alpha: float = 8, targets=None,
                  tinit: int = 0, tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                  orth_reg_weight: float = 0.5, total_step: int | None = None, init_weights: bool = True,
                  layers=None, adapter_name: str = "default", verbose: bool = True,
                  config: AdaLoraConfig | None = None) -> nn.Module:
    """Attach an AdaLoRA adapter named `adapter_name` (ΔW = 0 unless init_weights=False), make it the active one,
    and freeze everything else. targets None: PEFT's defaults for the family (q_proj, v_proj); total_step None:
    the trainer's run length. Options, targets and schedule are checked before the model changes. Returns the
    model (changed in place); prints the trainable parameter count when verbose."""
    config = (config or AdaLoraConfig(
        init_r=init_r, target_r=target_r, alpha=alpha, targets=targets, tinit=tinit, tfinal=tfinal, delta_t=delta_t,
        beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight, total_step=total_step, init_weights=init_weights,
        layers=layers)).resolve(model.config.model_type)
    config.check_pruning()
    if adapter_name in adapter_configs(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    plan = plan_or_refuse(model, config, AdaLoraLinear, "AdaLoRA")  # one line: the first problem, and how many
    _attach(model, plan, adapter_name, config)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"AdaLoRA '{adapter_name}': {len(plan)} modules, init_r={config.init_r}, "
                      f"target_r={config.target_r}, alpha={config.alpha}")
    return model


# -- PEFT adapter folders (the registry dispatches here on peft_type "ADALORA") ------------------------------

# PEFT options minicustom does not implement: (field, the value that means "off").
_UNSUPPORTED = (("lora_dropout", 0), ("bias", "none"), ("fan_in_fan_out", False), ("use_dora", False),
                ("alpha_pattern", {}), ("exclude_modules", None), ("modules_to_save", None), ("layers_pattern", None),
                ("layer_replication", None), ("lora_bias", False), ("target_parameters", None),
                ("trainable_token_indices", None), ("use_qalora", False), ("loftq_config", {}))
_FIELDS = {"r": "positive int", "init_r": "positive int", "target_r": "positive int", "lora_alpha": "number",
           "target_modules": "names", "init_lora_weights": "bool or str", "layers_to_transform": "layers",
           "deltaT": "positive int", "beta1": "number", "beta2": "number", "orth_reg_weight": "number",
           "total_step": "positive int", "rank_pattern": "object", "lora_dropout": "dropout", "bias": "str",
           "fan_in_fan_out": "bool", "use_dora": "bool", "use_rslora": "bool", "alpha_pattern": "numbers",
           "exclude_modules": "names", "modules_to_save": "name list", "lora_bias": "bool", "use_qalora": "bool"}


def to_peft(model: nn.Module, adapter_name: str):
    """(adapter_config.json as PEFT writes it for ADALORA, tensors, no extra files): the triplets the rank pattern
    drops are cut from the tensors, as PEFT's resize_state_dict_by_rank_pattern does. Merged or not, the factors
    are what is saved; total_step is null if no run has set it (PEFT refuses such a folder until it is given)."""
    config = adapter_configs(model)[adapter_name]
    pattern, state = config.rank_pattern or {}, {}
    for name, layer in _layers(model, adapter_name).items():
        keep = pattern.get(f"{name}.lora_E")
        for f, t in layer.adapter_state(adapter_name).items():
            rows = t.shape[1] if f == "lora_B" else t.shape[0]
            if keep is not None and rows != sum(keep):  # full rank still: cut the dropped triplets
                mask = torch.tensor(keep, device=t.device)
                t = t[:, mask] if f == "lora_B" else t[mask]
            state[f"{PREFIX}{name}.{f}"] = t
    return {
        "peft_type": "ADALORA", "task_type": "CAUSAL_LM", "r": 8, "init_r": config.init_r, "target_r": config.target_r,
        "lora_alpha": config.alpha, "tinit": config.tinit, "tfinal": config.tfinal, "deltaT": config.delta_t,
        "beta1": config.beta1, "beta2": config.beta2, "orth_reg_weight": config.orth_reg_weight,
        "total_step": config.total_step, "rank_pattern": config.rank_pattern, "target_modules": config.targets,
        "layers_to_transform": config.layers, "init_lora_weights": config.init_weights, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "use_rslora": False, "lora_bias": False,
        "use_qalora": False, "qalora_group_size": 16, "alpha_pattern": {}, "exclude_modules": None,
        "modules_to_save": None, "layers_pattern": None, "layer_replication": None, "loftq_config": {},
        "eva_config": None, "corda_config": None, "kasa_config": None, "lora_ga_config": None, "arrow_config": None,
        "monteclora_config": None, "velora_config": None, "alora_invocation_tokens": None, "use_bdlora": None,
        "megatron_config": None, "megatron_core": "megatron.core", "target_parameters": None,
        "trainable_token_indices": None, "ensure_weight_tying": False, "inference_mode": True, "auto_mapping": None,
        "base_model_name_or_path": None, "revision": None,
    }, state, {}


def _ranks(where: Path, pattern, plan: list[str], init_r: int) -> dict[str, int]:
    """module -> the rank its tensors have in the file: sum(rank_pattern[module + '.lora_E']), or init_r."""
    ranks = {}
    for key, keep in (pattern or {}).items():
        module = key.removesuffix(".lora_E")
        if not key.endswith(".lora_E") or module not in plan:
            raise AdapterError(f"{where}: rank_pattern key {key!r} is not '<module>.lora_E' of a targeted module")
        if not (isinstance(keep, list) and len(keep) == init_r and all(isinstance(k, bool) for k in keep)):
            raise AdapterError(f"{where}: rank_pattern[{key!r}] must be {init_r} (init_r) true/false values")
        ranks[module] = sum(keep)
    return ranks


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Attach PEFT's ADALORA folder: every targeted linear must have its three factors, of the ranks the rank
    pattern leaves, and every key must belong to a targeted linear; all of it is checked before the model changes."""
    where = path / CONFIG_FILE
    check_fields(peft, where, _FIELDS)
    # "none" means off in any of these fields, as LoRA's loader reads them.
    refuse_unsupported({k: v for k, v in peft.items() if v != "none"}, where, _UNSUPPORTED, "AdaLoRA")
    given = {"init_r": "init_r", "target_r": "target_r", "alpha": "lora_alpha", "tinit": "tinit", "tfinal": "tfinal",
             "delta_t": "deltaT", "beta1": "beta1", "beta2": "beta2", "orth_reg_weight": "orth_reg_weight",
             "total_step": "total_step"}
    try:
        config = AdaLoraConfig(**{k: peft[f] for k, f in given.items() if peft.get(f) is not None},
                               targets=peft.get("target_modules"), init_weights=peft.get("init_lora_weights") is not False,
                               layers=peft.get("layers_to_transform")).resolve(model.config.model_type)
    except ValueError as e:
        raise AdapterError(f"{where}: {e}") from None
    plan, problems = plan_linears(model, config, AdaLoraLinear, "AdaLoRA")
    if problems or not plan:
        raise AdapterError(f"{where}: target_modules {config.targets!r}: " + (
            "; ".join(problems) or "select no module of this model"))
    ranks = _ranks(where, peft.get("rank_pattern"), plan, config.init_r)
    config.rank_pattern = peft.get("rank_pattern") or None
    modules = dict(model.named_modules())
    found = {}
    for f in FACTORS:  # one key per module and factor: match each factor's keys on their own
        shape = {"lora_A": lambda m, r: (r, m.in_features), "lora_E": lambda m, r: (r, 1),
                 "lora_B": lambda m, r: (m.out_features, r)}[f]
        expected = {n: shape(modules[n], ranks.get(n, config.init_r)) for n in plan}
        keys = {k: t for k, t in tensors.items() if k.endswith("." + f)}
        others = {k: t for k, t in tensors.items() if not k.endswith(tuple("." + g for g in FACTORS))}
        found[f] = match_keys(path, {**keys, **others}, "." + f, expected, modules, "AdaLoRA", "linear",
                              config.targets, shape_note=lambda s: " (rank from rank_pattern or init_r)")

    # Checked: now change the model.
    layers = _attach(model, plan, adapter_name, config, ranks)
    with torch.no_grad():
        for f, by_name in found.items():
            for name, t in by_name.items():
                getattr(layers[name], f)[adapter_name].copy_(t)
    register_config(model, adapter_name, config)


ADALORA = Method(
    "adalora", lambda model, init_r=12, target_r=8, alpha=8.0, targets=None, tinit=0, tfinal=0, delta_t=1,
    orth_reg_weight=0.5: apply_adalora(model, init_r=init_r, target_r=target_r, alpha=alpha, targets=targets,
                                       tinit=tinit, tfinal=tfinal, delta_t=delta_t, orth_reg_weight=orth_reg_weight),
    "AdaLoRA: an SVD-shaped low-rank update whose ranks are pruned to a budget while training", lr=1e-3,
    mergeable=True, peft_type="ADALORA", options=(
        Option("init_r", 12, "AdaLoRA: each layer's rank before pruning", type=COUNT),
        Option("target_r", 8, "AdaLoRA: the average rank left after pruning", type=COUNT),
        Option("alpha", 8.0, "AdaLoRA alpha: ΔW is scaled by alpha / init_r (PEFT's default 8)", type=POSITIVE),
        Option("targets", None, "modules to adapt: all-linear, or names separated by commas (AdaLoRA without it: "
                                "PEFT's for the family, q_proj,v_proj)", type=targets_option),
        Option("tinit", 0, "AdaLoRA: warm-up steps before ranks are pruned", type=COUNT0),
        Option("tfinal", 0, "AdaLoRA: final steps with the rank mask fixed", type=COUNT0),
        Option("delta_t", 1, "AdaLoRA: steps between two maskings (PEFT's deltaT)", type=COUNT),
        Option("orth_reg_weight", 0.5, "AdaLoRA: weight of the orthogonality regularizer", type=NONNEGATIVE)),
    to_peft=to_peft, load_peft=load_peft)
