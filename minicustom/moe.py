"""A sparse Mixture-of-Experts feed-forward: Mixtral (Jiang et al. 2024, arXiv:2401.04088) and Qwen3-MoE.

    p      = softmax(x W_r^T)                       router probabilities over E experts, in fp32
    (w, i) = top-k(p);  w <- w / sum(w)              renormalized: Mixtral always, Qwen3-MoE if norm_topk_prob
    y      = sum_j w_j * down_{i_j}(act(gate_{i_j}(x)) * up_{i_j}(x))

Dispatch: the rows routed to an expert are gathered (index_select), the expert runs once on them, and its
weighted outputs are added back in place (index_add_): a small matmul per expert that any token chose, not
a dense pass of every expert over every token.

Load balancing (Switch Transformer, Fedus et al. 2022, eq. 4; transformers' `load_balancing_loss_func`):

    aux = E * sum_e f_e * P_e,   f_e: tokens routing one of their k choices to e, over N (the f_e sum to k),
                                 P_e: mean of p_e,

over the router logits of every MoE layer of a forward, padding excluded; a trainer adds
router_aux_loss_coef * aux to its loss. Each block keeps its last router logits for that (`router_logits`).

Layouts, loaded as the checkpoint stores them (no key map): one module per expert, as hub checkpoints
hold them (Qwen3-MoE `mlp.experts.N.{gate,up,down}_proj`, Mixtral `block_sparse_moe.experts.N.{w1,w3,w2}`),
where LoRA targets an expert's linears by name; or fused 3-D parameters, as transformers >= 5 holds them
in memory (`mlp.experts.gate_up_proj` (E, 2I, C) = [gate; up], `mlp.experts.down_proj` (E, C, I)), where
LoRA targets the parameters (PEFT's target_parameters). Left out: shared experts (Qwen2-MoE, DeepSeek),
router jitter noise (Mixtral's, 0 in every released config), and expert capacity limits.

Dimensions: N tokens (B * T), C hidden, E experts, k experts per token, I expert intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """W_r (E, C). Not an nn.Linear, so "all-linear" adapters leave it alone, as PEFT does on transformers' router."""

    def __init__(self, C: int, E: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(E, C))

    def forward(self, x):
        return F.linear(x, self.weight)  # (N, E)


class Expert(nn.Module):
    """One expert's SwiGLU under the checkpoint's names: gate/up/down_proj (Qwen3-MoE) or w1/w3/w2 (Mixtral)."""

    def __init__(self, C: int, I: int, act, mixtral: bool):
        super().__init__()
        if mixtral:
            self.w1, self.w3, self.w2 = nn.Linear(C, I, bias=False), nn.Linear(C, I, bias=False), nn.Linear(I, C, bias=False)
        else:
            self.gate_proj, self.up_proj = nn.Linear(C, I, bias=False), nn.Linear(C, I, bias=False)
            self.down_proj = nn.Linear(I, C, bias=False)
        self.act = act

    def forward(self, x):
        if hasattr(self, "w1"):
            return self.w2(self.act(self.w1(x)) * self.w3(x))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class FusedExperts(nn.Module):
    """Every expert's weights in two 3-D parameters, transformers >= 5's layout: gate_up_proj[e] = [gate_e; up_e]."""

    def __init__(self, C: int, I: int, E: int, act):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * I, C))
        self.down_proj = nn.Parameter(torch.zeros(E, C, I))
        self.act = act

    def expert(self, e: int, x):
        return swiglu(x, self.gate_up_proj[e], self.down_proj[e], self.act)


def swiglu(x, gate_up, down, act):
    """One fused expert on its rows x (n, C): gate_up (2I, C) = [gate; up], down (C, I)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # (n, I) each
    return F.linear(act(gate) * up, down)  # (n, C)


class SparseMoE(nn.Module):
    def __init__(self, config, act):
        super().__init__()
        C, E, I = config.hidden_size, config.num_experts, config.moe_intermediate_size
        self.top_k, self.renormalize = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = Router(C, E)
        if config.fused_experts:
            self.experts = FusedExperts(C, I, E, act)
        else:
            self.experts = nn.ModuleList(Expert(C, I, act, config.model_type == "mixtral") for _ in range(E))
        self.router_logits: torch.Tensor | None = None  # (N, E) of the last forward, for the auxiliary loss

    def expert(self, e: int, x):
        return self.experts[e](x) if isinstance(self.experts, nn.ModuleList) else self.experts.expert(e, x)

    def forward(self, x):
        B, T, C = x.shape
        h = x.reshape(B * T, C)  # (N, C)
        self.router_logits = self.gate(h)  # (N, E)
        p = self.router_logits.softmax(dim=-1, dtype=torch.float32)
        w, chosen = p.topk(self.top_k, dim=-1)  # (N, k)
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        w = w.to(x.dtype)
        out = torch.zeros_like(h)
        for e in chosen.unique().tolist():  # the experts some token chose, in order
            rows, slot = (chosen == e).nonzero(as_tuple=True)  # (n,): which tokens, and as which of their k
            out.index_add_(0, rows, self.expert(e, h.index_select(0, rows)) * w[rows, slot, None])
        return out.view(B, T, C)  # (B, T, C)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, attention_mask=None) -> torch.Tensor:
    """aux = E * sum_e f_e P_e over the (N, E) logits of every MoE layer; attention_mask (B, T) drops padding."""
    E = router_logits[0].shape[-1]
    keep = None if attention_mask is None else attention_mask.reshape(-1).float()  # (N,)
    counts, probs, rows = 0.0, 0.0, 0.0
    for logits in router_logits:
        p = logits.float().softmax(dim=-1)  # (N, E)
        chosen = p.topk(top_k, dim=-1).indices  # (N, k)
        slot = torch.ones_like(chosen, dtype=torch.float32) if keep is None else keep[:, None].expand_as(chosen)
        counts = counts + torch.zeros(E, device=p.device).scatter_add_(0, chosen.reshape(-1), slot.reshape(-1))
        probs = probs + (p if keep is None else p * keep[:, None]).sum(dim=0)
        rows = rows + (p.shape[0] if keep is None else keep.sum())
    return E * torch.sum(counts / rows * (probs / rows))
