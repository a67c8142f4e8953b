"""Losses: chunked cross-entropy for SFT, sequence log-probabilities, and the preference losses of DPO.

Next-token loss over a batch: position t predicts labels[t + 1], and only positions whose target is not
-100 count. Instead of the (B, T, V) logits of the usual `lm_head(h)` + `cross_entropy` (for
SmolLM2 at 4 x 256 tokens that is 200 MB, and the softmax and its gradient as much again), the hidden
states of the N trained positions are gathered and the loss is computed N_c rows at a time:

    z = h_c W^T                          (N_c, V) logits of one chunk
    loss_c = sum(logsumexp(z) - z[y])    summed, never averaged here
    dz = softmax(z) - onehot(y)          d loss_c / d z
    dh_c = dz W,  dW += dz^T h_c         the gradients, made in the same pass

The gradients are built in the forward pass and scaled by the incoming gradient in backward (the
"fused linear cross-entropy" of Liger-Kernel), so the peak is one (N_c, V) chunk. The sum is returned
with the number of trained tokens; the trainer divides by the total over all accumulation
micro-batches and processes, so every trained token weighs the same however the batch is split.
Left out: label smoothing and z-loss.

DPO needs log p(completion | prompt) per sequence rather than one sum (`sequence_logps`), and then one
of the preference losses below, each a function of four (B,) log-probs and two (B,) lengths, all behind
`preference_loss`.

The RLHF rung's objectives close the file: the reward model's Bradley–Terry loss (`reward_loss`), the
group and leave-one-out advantages of GRPO and RLOO, the clipped token-level policy loss with its four
aggregations (`policy_loss`), and KTO's loss for unpaired feedback (`kto_loss`, `kto_kl`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .precision import compute_dtype

IGNORE = -100


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) for h (N, C), W (V, C), y (N,), with the gradients made chunk by chunk."""

    @staticmethod
    def forward(ctx, h, W, y, chunk: int):
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = compute_dtype(h)  # the matmuls' dtype: autocast's under mixed precision, else h's
        h_dtype, W_dtype, h, W = h.dtype, W.dtype, h.to(dtype), W.to(dtype)
        grad_h = torch.empty_like(h) if need_h else None
        grad_W = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_W else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # one (N_c, V) fp32 buffer for every chunk: a fresh 50 MB tensor per chunk costs page faults on CPU
        z_buf = torch.empty((min(chunk, h.shape[0]), W.shape[0]), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.shape[0], chunk):
                hc, yc = h[i:i + chunk], y[i:i + chunk]
                z = z_buf[:hc.shape[0]]
                if dtype == torch.float32:
                    torch.mm(hc, W.T, out=z)  # (N_c, V) logits
                else:
                    z.copy_(hc @ W.T)  # half-precision matmul, fp32 softmax
                # log-softmax in place, row by row (each row's max and sum are read before it is written)
                torch.ops.aten._log_softmax.out(z, 1, False, out=z)
                total -= z.gather(1, yc[:, None]).sum()  # - log p(y)
                if need_h or need_W:
                    dz = z.exp_()  # softmax
                    dz[torch.arange(len(yc), device=dz.device), yc] -= 1.0  # d loss / d z = p - onehot(y)
                    dz = dz.to(dtype)
                    if need_h:
                        torch.mm(dz, W, out=grad_h[i:i + chunk])  # (N_c, C)
                    if need_W:
                        grad_W.addmm_(dz.T.float(), hc.float())  # (V, C), in fp32
        ctx.save_for_backward(grad_h, grad_W)
        ctx.dtypes = h_dtype, W_dtype
        return total

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_W = ctx.saved_tensors
        h_dtype, W_dtype = ctx.dtypes
        # grad_h * g in fp32, rounded once to grad_h's dtype, on every device (the kernel's dh in bf16 missed
        # its bound on CUDA, by g's low bits, while it multiplied a bf16 tensor by g directly)
        return ((grad_h.float() * g).to(grad_h.dtype).to(h_dtype) if grad_h is not None else None,
                (grad_W * g).to(W_dtype) if grad_W is not None else None, None, None)


def trained_positions(hidden, labels):
    """Hidden states (N, C) of the positions whose next token is trained, and those targets (N,)."""
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


def sft_loss(hidden, labels, lm_head: nn.Module, chunk: int = 512):
    """(sum of next-token cross-entropy over trained positions, number of trained positions).

    hidden (B, T, C) are the final-norm hidden states, labels (B, T) the ids with -100 where not trained.
    A plain bias-free Linear head takes the fused chunked path above; any other head (a LoRA-wrapped
    lm_head, say) is run chunk by chunk under activation checkpointing, which recomputes each chunk's
    logits in backward instead of keeping them."""
    h, y = trained_positions(hidden, labels)
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0, 0
    if type(lm_head) is nn.Linear and lm_head.bias is None:
        return LinearCrossEntropy.apply(h, lm_head.weight, y, chunk), n
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, lm_head, h[i:i + chunk], y[i:i + chunk],
                                                          use_reentrant=False)
    return total, n


def _chunk_loss(lm_head, h, y):
    return F.cross_entropy(lm_head(h).float(), y, reduction="sum")


def sequence_logps(hidden, labels, lm_head: nn.Module, chunk: int = 512):
    """(log p(completion | prompt) per sequence (B,), trained tokens per sequence (B,)).

    The sum over the trained positions of row b of log softmax(h_t W^T)[labels[t + 1]]: the completion's
    log-probability, the prompt and padding (label -100) left out. The logits are made N_c positions at a
    time under activation checkpointing, so a chunk's (N_c, V) logits are recomputed in backward rather
    than kept; the fused path of sft_loss cannot serve here, since each row's gradient is scaled by its own
    incoming gradient (the preference loss's d loss / d logp_b), known only in backward."""
    values, keep = _trained_logps(hidden, labels, lm_head, chunk)
    row = keep.nonzero()[:, 0]  # (N,) the sequence of each trained position
    sums = hidden.new_zeros(labels.shape[0], dtype=torch.float32).index_add(0, row, values)
    return sums, keep.sum(1)


def token_logps(hidden, labels, lm_head: nn.Module, chunk: int = 512, temperature: float = 1.0):
    """Per-token log p(labels[:, t + 1]) (B, T - 1), 0 where the label is -100: the RL losses' log-probs, of
    the logits divided by the sampling temperature (the distribution the completions were drawn from)."""
    values, keep = _trained_logps(hidden, labels, lm_head, chunk, temperature)
    return hidden.new_zeros(keep.shape, dtype=torch.float32).masked_scatter(keep, values)


def _trained_logps(hidden, labels, lm_head, chunk, temperature: float = 1.0):
    """(N,) log-probs of the trained next tokens in row-major order, and where they are (B, T - 1)."""
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    h, y = hidden[:, :-1][keep], targets[keep]  # (N, C), (N,)
    parts = [torch.utils.checkpoint.checkpoint(_chunk_logps, lm_head, h[i:i + chunk], y[i:i + chunk], temperature,
                                               use_reentrant=False) for i in range(0, y.numel(), chunk)]
    return (torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)), keep


def _chunk_logps(lm_head, h, y, temperature: float = 1.0):
    logits = lm_head(h).float()
    return -F.cross_entropy(logits / temperature if temperature != 1.0 else logits, y, reduction="none")  # log p(y)


# -- preference losses --------------------------------------------------------------------------------
# For each of B pairs (prompt x, chosen y_w, rejected y_l), from sequence log-probs and completion lengths:
#   c = log π(y_w) − log π_ref(y_w),  r = log π(y_l) − log π_ref(y_l)   chosen, rejected log-ratios
#   h = c − r                                                          the DPO margin
#   h_avg = c/|y_w| − r/|y_l|,  a_w = log π(y_w)/|y_w|,  a_l = log π(y_l)/|y_l|
# β is the inverse temperature (IPO's τ, ORPO's λ), ε the label smoothing (noise rate). The formulas are
# TRL 1.16's (DPOTrainer._compute_loss, CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss), checked against
# them in tests/test_preference_losses.py. Left out of TRL's DPO: f-divergence scores, LD-DPO's
# down-weighted tails, WPO weights, AlphaPO rewards; every loss here is a function of four (B,) log-probs
# and two (B,) lengths.


@dataclass
class PreferenceLosses:
    losses: torch.Tensor  # (B,) Σ_k w_k loss_k per pair; the trainer reduces it
    chosen_rewards: torch.Tensor  # (B,) β c, or β a_w for SimPO / ORPO; detached
    rejected_rewards: torch.Tensor  # (B,) β r, or β a_l


@dataclass
class Pairs:
    """A batch of pairs in float32 and the hyperparameters: what each loss below is a function of."""
    logp_w: torch.Tensor  # (B,) log π(y_w)
    logp_l: torch.Tensor  # (B,) log π(y_l)
    ref_w: torch.Tensor  # (B,) log π_ref(y_w); zeros when reference-free
    ref_l: torch.Tensor  # (B,) log π_ref(y_l)
    n_w: torch.Tensor | None  # (B,) |y_w| clamped at 1, as TRL; None when not given
    n_l: torch.Tensor | None  # (B,) |y_l|
    beta: float
    eps: float
    tau: float
    gamma: float

    @property
    def c(self):
        return self.logp_w - self.ref_w

    @property
    def r(self):
        return self.logp_l - self.ref_l

    @property
    def h(self):
        return self.c - self.r

    @property
    def h_avg(self):
        return self.c / self.n_w - self.r / self.n_l

    @property
    def a_w(self):
        return self.logp_w / self.n_w

    @property
    def a_l(self):
        return self.logp_l / self.n_l


def _logistic(z, eps):
    """−(1 − ε) log σ(z) − ε log σ(−z): the logistic loss of a margin z whose label flips with chance ε."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def dpo(p: Pairs):
    """DPO (Rafailov et al. 2023, Eq. 7): −log σ(βh). With ε > 0 it is conservative DPO (cDPO, Mitchell 2023),
    −(1 − ε) log σ(βh) − ε log σ(−βh), the expected loss under labels flipped with probability ε (as TRL's
    CPOTrainer; TRL 1.16's DPOTrainer ignores ε here)."""
    return _logistic(p.beta * p.h, p.eps)


def robust_dpo(p: Pairs):
    """Robust DPO (Chowdhury et al. 2024): ((1 − ε) ℓ(βh) − ε ℓ(−βh)) / (1 − 2ε) with ℓ(z) = −log σ(z), an
    unbiased estimate of the clean-label loss when labels flip with probability ε < 1/2."""
    z = p.beta * p.h
    return (-(1 - p.eps) * F.logsigmoid(z) + p.eps * F.logsigmoid(-z)) / (1 - 2 * p.eps)


def hinge(p: Pairs):
    """SLiC's hinge (Zhao et al. 2023) on the normalised margin of RSO (Liu et al. 2023): max(0, 1 − βh)."""
    return torch.relu(1 - p.beta * p.h)


def ipo(p: Pairs):
    """IPO (Azar et al. 2023, Eq. 17, β is the paper's τ): (h_avg − 1/(2β))², a regression of the margin onto
    1/(2β) instead of a push to infinity. Per-token log-ratios, as TRL (agreed with the IPO authors): the
    summed margin would make the square grow with the completion length."""
    return (p.h_avg - 1 / (2 * p.beta)) ** 2


def exo_pair(p: Pairs):
    """EXO (Ji et al. 2024, Eq. 16): KL(q ‖ p_ε) between the model's choice q = (σ(βh), σ(−βh)) and the
    smoothed label p_ε = (1 − ε, ε): σ(βh)(log σ(βh) − log(1 − ε)) + σ(−βh)(log σ(−βh) − log ε), ε > 0."""
    z = p.beta * p.h
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-p.eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(p.eps)))


def nca_pair(p: Pairs):
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment"): −log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr). Each
    log-ratio is scored on its own, so lowering y_l cannot pay for lowering y_w too."""
    return -F.logsigmoid(p.beta * p.c) - 0.5 * F.logsigmoid(-p.beta * p.c) - 0.5 * F.logsigmoid(-p.beta * p.r)


def bco_pair(p: Pairs):
    """BCO (Jung et al. 2024): y_w classed as 1 and y_l as 0 by the rewards βc, βr, −log σ(βc) − log σ(−βr).
    The paper's reward shift δ (a running mean of the rewards) is left out, as in TRL's DPO."""
    return -F.logsigmoid(p.beta * p.c) - F.logsigmoid(-p.beta * p.r)


def sppo_hard(p: Pairs):
    """SPPO (Wu et al. 2024, Eq. 4.7) with hard win probabilities P(y_w ≻ y_l) = 1, P(y_l ≻ y_w) = 0:
    (c − 1/(2β))² + (r + 1/(2β))², each log-ratio regressed onto ±1/(2β)."""
    return (p.c - 0.5 / p.beta) ** 2 + (p.r + 0.5 / p.beta) ** 2


def aot(p: Pairs):
    """AOT (Melnyk et al. 2024), paired: stochastic dominance of the policy's margins over the reference's, by
    1-D optimal transport, i.e. sorting over the batch: δ = sort(log π(y_w) − log π(y_l)) −
    sort(log π_ref(y_w) − log π_ref(y_l)), loss −(1 − ε) log σ(βδ) − ε log σ(−βδ). Entry i of the result
    belongs to the i-th quantile, not to pair i."""
    delta = torch.sort(p.logp_w - p.logp_l).values - torch.sort(p.ref_w - p.ref_l).values
    return _logistic(p.beta * delta, p.eps)


def aot_unpaired(p: Pairs):
    """AOT unpaired (Melnyk et al. 2024): chosen log-ratios dominate rejected ones as distributions,
    δ = sort(c) − sort(r), loss −(1 − ε) log σ(βδ) − ε log σ(−βδ)."""
    delta = torch.sort(p.c).values - torch.sort(p.r).values
    return _logistic(p.beta * delta, p.eps)


def apo_zero(p: Pairs):
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): (1 − σ(βc)) + σ(βr), raising y_w and lowering y_l; for
    chosen answers better than the model's own."""
    return 1 - torch.sigmoid(p.beta * p.c) + torch.sigmoid(p.beta * p.r)


def apo_down(p: Pairs):
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): σ(βc) + (1 − σ(βh)), lowering both, y_l the more; for
    chosen answers worse than the model's own."""
    return torch.sigmoid(p.beta * p.c) + 1 - torch.sigmoid(p.beta * p.h)


def discopop(p: Pairs):
    """DiscoPOP (Lu et al. 2024, Eq. 5), found by LLM-driven search: with z = βh and m = σ(z/τ),
    (1 − m)(−log σ(z)) + m e^{−z}, logistic for z ≪ 0 and exponential for z ≫ 0. m e^{−z} is formed as
    exp(log σ(z/τ) − z): TRL's product is ∞ · 0 = NaN once z < −88 (e^{−z} overflows fp32 where m is 0)."""
    z = p.beta * p.h
    return -F.logsigmoid(z) * torch.sigmoid(-z / p.tau) + torch.exp(F.logsigmoid(z / p.tau) - z)


def sigmoid_norm(p: Pairs):
    """Length-normalised DPO (as in Tülu 3, Lambert et al. 2024): −log σ(β h_avg)."""
    return -F.logsigmoid(p.beta * p.h_avg)


def chosen_nll(p: Pairs):
    """−log π(y_w)/|y_w|, the chosen completion's NLL per token, RPO's added term (Pang et al. 2024). TRL's
    `sft` averages over all chosen tokens of the batch instead; the two agree when the |y_w| are equal."""
    return -p.logp_w / p.n_w


def simpo(p: Pairs):
    """SimPO (Meng et al. 2024, Eq. 6), reference-free: the average log-prob is the reward, γ a target margin,
    −(1 − ε) log σ(β(a_w − a_l) − γ) − ε log σ(−β(a_w − a_l) + γ)."""
    return _logistic(p.beta * (p.a_w - p.a_l) - p.gamma, p.eps)


def orpo(p: Pairs):
    """ORPO (Hong et al. 2024, Eqs. 6-7), reference-free, β is the paper's λ: the chosen NLL plus an odds
    ratio penalty, −a_w − β log σ(log odds(y_w) − log odds(y_l)) where odds(y) = P/(1 − P) of P = e^a, so
    log odds(y_w) − log odds(y_l) = (a_w − a_l) − (log(1 − e^{a_w}) − log(1 − e^{a_l}))."""
    a_w, a_l = p.a_w, p.a_l
    # log(1 − e^a) as log(−expm1(a)): exact as a → 0 (P → 1), where log1p(−e^a) cancels; for a ≪ 0 its
    # absolute error is below e^a, nothing next to the O(1) log-odds
    log_odds = (a_w - a_l) - (torch.log(-torch.expm1(a_w)) - torch.log(-torch.expm1(a_l)))
    return -a_w - p.beta * F.logsigmoid(log_odds)


_LOSSES = {"sigmoid": dpo, "robust": robust_dpo, "hinge": hinge, "ipo": ipo, "exo_pair": exo_pair,
           "nca_pair": nca_pair, "bco_pair": bco_pair, "sppo_hard": sppo_hard, "aot": aot,
           "aot_unpaired": aot_unpaired, "apo_zero": apo_zero, "apo_down": apo_down, "discopop": discopop,
           "sigmoid_norm": sigmoid_norm, "sft": chosen_nll, "simpo": simpo, "orpo": orpo}
LOSS_TYPES = tuple(_LOSSES)
_NEEDS_LENGTHS = {"ipo", "sigmoid_norm", "sft", "simpo", "orpo"}
REFERENCE_FREE = {"sft", "simpo", "orpo"}  # losses of the policy alone


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                    ref_rejected_logps=None, loss_type="sigmoid", beta=0.1, label_smoothing=0.0,
                    chosen_lengths=None, rejected_lengths=None, *, loss_weights=None, reference_free=False,
                    rpo_alpha=None, simpo_gamma=0.5, discopop_tau=0.05) -> PreferenceLosses:
    """Per-pair Σ_k w_k loss_k over loss_type (a name of LOSS_TYPES or a list of them, weights loss_weights,
    default 1), plus rpo_alpha · (−log π(y_w)/|y_w|) when rpo_alpha is set (RPO, Pang et al. 2024).

    The log-probs are (B,) sums over completion tokens (`sequence_logps`), the lengths (B,) completion token
    counts. reference_free=True takes log π_ref = 0. Rewards are β c, β r, or β a_w, β a_l when the first
    loss type is simpo or orpo."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if not types or any(t not in _LOSSES for t in types):
        raise ValueError(f"loss_type {loss_type!r}: expected one or more of {', '.join(LOSS_TYPES)}")
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for the {len(types)} loss_type {types}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if "robust" in types and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing ('robust' flip rate) must be in [0, 0.5): {label_smoothing}")
    if "exo_pair" in types and not 0 < label_smoothing < 1:
        raise ValueError(f"label_smoothing ('exo_pair' ε, e.g. 1e-3) must be in (0, 1): {label_smoothing}")
    no_ref = ref_chosen_logps is None or ref_rejected_logps is None
    if no_ref and not reference_free and (need := [t for t in types if t not in REFERENCE_FREE]):
        raise ValueError(f"loss_type {need} needs ref_chosen_logps and ref_rejected_logps, or reference_free")
    need = [t for t in types if t in _NEEDS_LENGTHS] + (["rpo_alpha"] if rpo_alpha is not None else [])
    if need and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"{need} needs chosen_lengths and rejected_lengths (completion token counts)")
    shape = tuple(policy_chosen_logps.shape)
    for name, x in [("policy_chosen_logps", policy_chosen_logps),
                    ("policy_rejected_logps", policy_rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps), ("chosen_lengths", chosen_lengths),
                    ("rejected_lengths", rejected_lengths)]:
        if x is not None and (x.dim() != 1 or tuple(x.shape) != shape):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {shape}, one entry per pair")

    logp_w, logp_l = policy_chosen_logps.float(), policy_rejected_logps.float()
    ref_w, ref_l = ((torch.zeros_like(logp_w),) * 2 if reference_free or no_ref
                    else (ref_chosen_logps.float(), ref_rejected_logps.float()))
    n_w, n_l = (None if n is None else n.float().clamp(min=1) for n in (chosen_lengths, rejected_lengths))
    p = Pairs(logp_w, logp_l, ref_w, ref_l, n_w, n_l, beta, label_smoothing, discopop_tau, simpo_gamma)
    losses = sum(w * _LOSSES[t](p) for t, w in zip(types, weights))
    if rpo_alpha is not None:
        losses = losses + rpo_alpha * chosen_nll(p)
    if types[0] in ("simpo", "orpo"):
        chosen_rewards, rejected_rewards = beta * p.a_w, beta * p.a_l
    else:
        chosen_rewards, rejected_rewards = beta * p.c, beta * p.r
    return PreferenceLosses(losses, chosen_rewards.detach(), rejected_rewards.detach())


# -- the RLHF rung: reward models, policy-gradient objectives, KTO ----------------------------------------
#
# Shapes: B completions (G consecutive per prompt for the group methods), T completion positions; `mask` is 1
# on a completion's tokens and 0 on padding. Every function returns what one batch on one process contributes;
# the trainer's loop does the accumulation.

def reward_loss(chosen, rejected, margin=None, center_coefficient=None):
    """Bradley–Terry (Stiennon et al. 2020, Ouyang et al. 2022): the reward model r scores the chosen
    completion above the rejected one,

        L = mean(−log σ(r_w − r_l − m)) + c · mean((r_w + r_l)²)

    with an optional per-pair margin m (Llama 2's) and centering coefficient c (Eisenstein et al. 2023,
    TRL's center_rewards_coefficient), which pulls the rewards toward zero mean. chosen, rejected (B,)."""
    diff = chosen - rejected - (0 if margin is None else margin)
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def _grouped(rewards, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}; expected (B,), one reward per completion")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the batch of {rewards.shape[0]} completions "
                         "(G completions per prompt, one after another)")
    return rewards.view(-1, group_size)  # (prompts, G)


ADVANTAGE_SCALES = ("group", "batch", "none")


def group_advantages(rewards, group_size: int, scale: str = "group"):
    """GRPO's critic-free advantage (Shao et al. 2024): each completion's reward against its group's mean,

        A_i = (r_i − mean_group(r)) / (std + 1e-4)

    std: the group's ("group"), the whole batch's ("batch", Hu et al.'s REINFORCE++ / Liu et al.), or no
    division ("none": Dr. GRPO, Liu et al. 2025, which finds the division biases toward easy and hard
    prompts). The std is the unbiased one and the 1e-4 sits outside it, as TRL computes them. rewards (B,),
    G consecutive per prompt; returns (B,)."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale {scale!r}: expected one of {', '.join(ADVANTAGE_SCALES)}")
    grouped = _grouped(rewards, group_size)  # (P, G)
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (B,)
    if scale == "none":
        return centered
    if scale == "group":
        std = (grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped))
        std = std.expand_as(grouped).reshape(-1)
    else:
        std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards[0])
    return centered / (std + 1e-4)


def rloo_advantages(rewards, group_size: int):
    """RLOO (Ahmadian et al. 2024, after Kool et al. 2019): each completion's baseline is the mean reward of
    the other G − 1 completions of its prompt, A_i = r_i − (Σ_j r_j − r_i) / (G − 1). rewards (B,); (B,)."""
    grouped = _grouped(rewards, group_size)  # (P, G)
    if group_size == 1:
        raise ValueError("RLOO needs at least two completions per prompt (group_size >= 2)")
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def policy_loss(logps, old_logps, advantages, mask, loss_type: str = "grpo", epsilon_low: float = 0.2,
                epsilon_high: float | None = None, beta: float = 0.0, ref_logps=None,
                max_completion_length: int | None = None):
    """The clipped policy-gradient objective of PPO (Schulman et al. 2017) at the token level, as GRPO uses
    it, with an optional KL penalty to the reference:

        ρ_t = exp(log π(y_t) − log π_old(y_t))
        ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β (e^{δ_t} − δ_t − 1),  δ_t = log π_ref − log π

    The KL term is Schulman's k3 estimate, unbiased and ≥ 0; ε_high > ε_low is DAPO's clip-higher (Yu et
    al. 2025). The token losses are aggregated by loss_type:
      grpo     mean over completions of each one's token mean (long completions weigh no more than short ones)
      bnpo     token mean over the batch
      dr_grpo  token sum / (B · max_completion_length): Dr. GRPO's constant normalizer, no length bias
      dapo     token sum / completion tokens in the batch (one process, no accumulation: = bnpo here)
    logps, old_logps, ref_logps, mask (B, T); advantages (B,), one per completion, or (B, T), one per token
    (PPO's, from gae). A completion with no token contributes 0."""
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {', '.join(POLICY_LOSS_TYPES)}")
    if logps.dim() != 2 or old_logps.shape != logps.shape or mask.shape != logps.shape:
        raise ValueError(f"logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)} and mask "
                         f"{tuple(mask.shape)} must share one (B, T) shape")
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected ({logps.shape[0]},) or "
                         f"{tuple(logps.shape)}")
    if beta and (ref_logps is None or ref_logps.shape != logps.shape):
        raise ValueError(f"beta={beta} needs ref_logps of shape {tuple(logps.shape)}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length (its constant normalizer)")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    A = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    ratio = torch.exp(logps - old_logps)  # (B, T)
    per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high) * A)
    if beta:
        delta = ref_logps - logps
        per_token = per_token + beta * (torch.exp(delta) - delta - 1)
    mask = mask.to(per_token.dtype)
    total = per_token * mask
    if loss_type == "grpo":
        return (total.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return total.sum() / (logps.shape[0] * max_completion_length)
    return total.sum() / mask.sum().clamp(min=1.0)  # bnpo, dapo


def clip_fraction(logps, old_logps, advantages, mask, epsilon_low: float = 0.2, epsilon_high: float | None = None):
    """The share of completion tokens whose ratio the clip holds back (a metric of the policy's step size)."""
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    A = advantages[:, None] if advantages.dim() == 1 else advantages
    clipped = ((ratio < 1 - epsilon_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
    mask = mask.bool()
    return (clipped & mask).sum() / mask.sum().clamp(min=1)


def sequence_policy_loss(logps, old_logps, advantages, epsilon_low: float = 0.2, epsilon_high: float | None = None):
    """RLOO's clipped objective (TRL's RLOOTrainer), on whole completions rather than tokens:

        ρ = exp(log π(y) − log π_old(y)),   L = mean_b −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A)

    logps, old_logps (B,) summed over each completion's tokens; advantages (B,). A KL penalty, if any, is
    already in the rewards (rl.py), not in this loss."""
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high) * advantages).mean()


@dataclass
class UnpairedLosses:
    losses: torch.Tensor  # (B,) per completion, weighted; the trainer reduces it
    rewards: torch.Tensor  # (B,) β (log π(y|x) − log π_ref(y|x)); detached


def kto_kl(policy_kl_logps, ref_kl_logps):
    """KTO's reference point z0: the batch estimate of KL(π ‖ π_ref) from mismatched (prompt, completion)
    pairs, mean(log π − log π_ref), detached and clamped at 0 (the KL is ≥ 0; its estimate need not be)."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps, ref_logps, desirable, kl, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> UnpairedLosses:
    """KTO (Ethayarajh et al. 2024, Eq. 7): prospect-theoretic value of each completion against the
    reference point z0 (`kl`, from kto_kl), for unpaired thumbs-up/down feedback,

        desirable:    λ_D (1 − σ(β (log-ratio − z0)))
        undesirable:  λ_U (1 − σ(β (z0 − log-ratio))),    log-ratio = log π(y|x) − log π_ref(y|x)

    policy_logps, ref_logps (B,) sequence log-probs; desirable (B,) bool."""
    if not (policy_logps.shape == ref_logps.shape == desirable.shape) or policy_logps.dim() != 1:
        raise ValueError(f"policy_logps {tuple(policy_logps.shape)}, ref_logps {tuple(ref_logps.shape)} and "
                         f"desirable {tuple(desirable.shape)} must each be (B,)")
    logratio = policy_logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return UnpairedLosses(torch.where(desirable.bool(), good, bad), (beta * logratio).detach())


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """PPO's advantages by generalized advantage estimation (Schulman et al. 2016), per completion token:

        δ_t = r_t + γ V_{t+1} − V_t,   A_t = δ_t + γ λ A_{t+1},   returns_t = A_t + V_t

    with V and A zero past a completion's last token. rewards, values, mask (B, T), the rewards already
    holding InstructGPT's per-token KL penalty and the score on the last token. Returns (A, returns)."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages, next_value, next_adv = torch.zeros_like(values), torch.zeros_like(values[:, 0]), 0.0
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, advantages + values


def value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """PPO's clipped value loss: 0.5 · max((V − R)², (V_old + clip(V − V_old, ±c) − R)²), token mean."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    per_token = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
