"""Critic-free online RL: GRPO and RLOO, on the loop every objective shares.

GRPO (Shao et al. 2024, "DeepSeekMath", §4.1, as TRL 1.16's GRPOTrainer computes it): for each prompt q,
sample G completions o_1..o_G from π_old, score them r_1..r_G, and take group-relative advantages

    A_i = (r_i − mean(r)) / (std(r) + 1e-4)           (scale "group"; "batch" std; "none": Dr. GRPO)
    L = agg_t [ −min(ρ_t A_i, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_i) + β (e^{δ_t} − δ_t − 1) ]
    ρ_t = π(o_t | q, o_<t) / π_old(o_t | ...),   δ_t = log π_ref(o_t) − log π(o_t)

aggregated over tokens by loss_type (losses.policy_loss: grpo, bnpo, dr_grpo, dapo), each with TRL's
normalizer over a step of several micro-batches and processes: grpo the completions', dr_grpo the
completions' times max_new_tokens, dapo the step's completion tokens, bnpo each micro-batch's own tokens
(its token mean, averaged over the micro-batches). Log-probs are those of the logits divided by the
sampling temperature, as TRL computes them: π_old is then the distribution that was sampled.
RLOO (Ahmadian et al. 2024, as TRL's RLOOTrainer): the baseline of completion i is the mean reward of
the other G − 1, A_i = r_i − mean_{j≠i} r_j, the KL penalty β Σ_t (log π_old − log π_ref) is taken from
the reward, and the clipped ratio is that of whole completions (losses.sequence_policy_loss).

A rollout holds (batch_size × grad_accum × processes) completions: that many / G prompts, G each. It is
reused for num_iterations optimizer steps (π_old: the policy that sampled it; with one iteration ρ = 1
and π_old is the policy itself, detached). Rewards come from rewards.CombinedReward (verifiable
scorers, Python functions, a reward model). The reference for β > 0 is named as in DPO: "base"
(adapters disabled), "snapshot", or a model folder. Under torchrun every process samples the whole
rollout (the same seed: the same completions) and trains on its share.
Dynamic sampling (DAPO, Yu et al. 2025, §3.2): a group whose G rewards are all equal has zero advantage
and teaches nothing, so up to `dynamic_sampling` more rounds draw fresh prompts (as many as a rollout's,
from the others in a seeded order) and put their groups with unequal rewards in the equal ones' places;
groups still equal after the last round are trained as they are. The rollout's reward metrics are those
of its first draw, the policy's own; `groups_drawn` and `groups_replaced` count the rest.
The policy's forward runs each prompt once for the G rows that follow it (rollout.rows_hidden), as the
sampler's prefill does: the same gradient, 1.42x faster an update at the demo's 70-token prompts and
64-token completions (benchmarks/bench_grpo.py). TRL runs every row whole.
Left out: vLLM generation, entropy masking, importance-sampling correction, multi-turn tool use.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..data import IGNORE
from ..losses import (
    ADVANTAGE_SCALES,
    POLICY_LOSS_TYPES,
    clip_fraction,
    group_advantages,
    policy_loss,
    rloo_advantages,
    sequence_policy_loss,
    token_logps,
)
from .loop import run
from .rollout import RolloutTask, SamplingConfig, rows_hidden, rows_table, sample, score, table_logps


@dataclass
class RLConfig(SamplingConfig):
    """SamplingConfig plus GRPO's and RLOO's options. batch_size counts completions per micro-batch."""

    algorithm: str = "grpo"  # grpo | rloo
    num_generations: int = 4  # G, completions per prompt
    num_iterations: int = 1  # optimizer steps per rollout (μ)
    loss_type: str = "grpo"  # GRPO's token aggregation: grpo | bnpo | dr_grpo | dapo
    scale: str = "group"  # GRPO's advantage scale: group | batch | none
    normalize_advantages: bool = False  # RLOO: whiten the advantages of a rollout
    dynamic_sampling: int = 0  # DAPO: rounds of fresh prompts that replace groups with equal rewards

    def __post_init__(self):
        super().__post_init__()
        if self.beta is None:  # TRL's defaults: GRPO without a reference, RLOO with its KL in the reward
            self.beta = 0.05 if self.algorithm == "rloo" else 0.0
        grpo = self.algorithm == "grpo"
        self.check({
            "algorithm": (self.algorithm in ("grpo", "rloo"), "grpo or rloo"),
            "num_generations": (self.num_generations >= 2, ">= 2 (one completion alone has no advantage)"),
            "num_iterations": (self.num_iterations >= 1, ">= 1"),
            "loss_type": (self.loss_type in POLICY_LOSS_TYPES and (grpo or self.loss_type == "grpo"),
                          "one of " + ", ".join(POLICY_LOSS_TYPES) + " (GRPO's; RLOO's loss is per completion)"),
            "scale": (self.scale in ADVANTAGE_SCALES and (grpo or self.scale == "group"),
                      "one of " + ", ".join(ADVANTAGE_SCALES) + " (GRPO's; RLOO: normalize_advantages)"),
            "normalize_advantages": (not (grpo and self.normalize_advantages), "False for GRPO (its scale option)"),
            "dynamic_sampling": (self.dynamic_sampling >= 0, ">= 0 (extra sampling rounds)"),
        })


def check_group(config: RLConfig, world: int = 1) -> int:
    """Prompts per rollout: the completions of a step must hold whole groups of G."""
    per_step = config.batch_size * config.grad_accum * world
    if per_step % config.num_generations:
        raise ValueError(f"num_generations {config.num_generations} does not divide the {per_step} completions of a "
                         f"step (batch_size {config.batch_size} x grad_accum {config.grad_accum} x {world} "
                         "processes): each prompt's G completions must fall in one step")
    return per_step // config.num_generations


class PolicyLoss(nn.Module):
    """The policy's per-token log-probs of the rows' completions and the clipped objective, summed over
    the micro-batch in the unit the loop divides by (the batch's weight)."""

    def __init__(self, model: nn.Module, config: RLConfig):
        super().__init__()
        self.model, self.config = model, config

    def forward(self, input_ids, labels, advantages, weight, old_logps=None, ref_logps=None, **_):
        c = self.config
        h = rows_hidden(self.model, input_ids, labels)  # (B, T, C)
        logps = token_logps(h, labels, self.model.head(), c.loss_chunk, c.temperature)  # (B, T-1)
        mask = labels[:, 1:] != IGNORE
        old = logps.detach() if old_logps is None else old_logps
        if c.algorithm == "rloo":
            seq, old_seq = (logps * mask).sum(-1), (old * mask).sum(-1)
            loss = sequence_policy_loss(seq, old_seq, advantages, c.epsilon, c.epsilon_high)
            ratio, high = torch.exp(seq.detach() - old_seq), c.epsilon if c.epsilon_high is None else c.epsilon_high
            clipped = ((ratio < 1 - c.epsilon) & (advantages < 0)) | ((ratio > 1 + high) & (advantages > 0))
            stats = {"clip_ratio": clipped.float().mean()}  # of whole completions, as RLOO clips them
        else:
            loss = policy_loss(logps, old, advantages, mask, c.loss_type, c.epsilon, c.epsilon_high,
                               c.beta, ref_logps, c.max_new_tokens)
            stats = {"clip_ratio": clip_fraction(logps.detach(), old, advantages, mask, c.epsilon, c.epsilon_high)}
            if ref_logps is not None:  # the k3 estimate in the loss, per token (RLOO's KL is the rollout's)
                delta = ref_logps - logps.detach()
                stats["kl"] = ((delta.exp() - delta - 1) * mask).sum() / mask.sum().clamp(min=1)
        w = weight.float()  # a token count, exact in fp32 (bf16 rounds integers above 256)
        return loss * w + h.sum() * 0.0, {k: v * w for k, v in stats.items()}  # h.sum() * 0: a filler's graph


def _all_equal(rewards: torch.Tensor) -> bool:
    """A group whose rewards are all equal: every advantage 0, no gradient."""
    return bool((rewards == rewards[0]).all())


class RLTask(RolloutTask):
    """GRPO and RLOO as a `Task` of the loop: rollouts of G completions per prompt, reused num_iterations
    times."""

    def __init__(self, prompts, config: RLConfig, reward, tokenizer, stop_ids, pad_id, reference=None,
                 eval_prompts=None):
        super().__init__(prompts, config, reward, tokenizer, stop_ids, pad_id, reference, eval_prompts)
        self.updates = config.num_iterations

    def prompts_per_rollout(self, world: int) -> int:
        return check_group(self.config, world)

    def step_rows(self, epoch: int, r: int, n_rows: int) -> list[list[int]]:
        return [list(range(n_rows))] * self.updates

    def weight_of(self, batch: dict) -> int:
        """TRL's normalizers: completions (grpo, RLOO), the step's tokens (dapo), completions x
        max_new_tokens (dr_grpo); bnpo's is the micro-batch's own token mean, so each weighs 1."""
        c, rows = self.config, batch["labels"].shape[0]
        if c.algorithm == "rloo" or c.loss_type == "grpo":
            return rows
        if c.loss_type == "dr_grpo":
            return rows * c.max_new_tokens
        if c.loss_type == "bnpo":
            return 1
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss_module(self, model: nn.Module) -> nn.Module:
        return PolicyLoss(model, self.config)

    def _draw(self, model, prompts, generator) -> tuple[list[tuple], dict[str, float]]:
        """G completions of each prompt, scored: one (rows, ids, texts, rewards) per prompt, and each reward
        source's mean."""
        G = self.config.num_generations
        rows = [p for p in prompts for _ in range(G)]
        ids, texts = sample(model, self.tokenizer, rows, self.config, self.stop_ids, self.pad_id, generator)
        rewards, means = score(self.reward, self.tokenizer, rows, ids, texts)
        return [(rows[i:i + G], ids[i:i + G], texts[i:i + G], rewards[i:i + G]) for i in range(0, len(rows), G)], means

    def _refill(self, model, groups: list[tuple], generator, reserve) -> dict:
        """Dynamic sampling: groups of fresh prompts from `reserve` take the places of groups whose rewards
        are all equal (in `groups`, in place), for up to config.dynamic_sampling rounds."""
        reserve, drawn, replaced = iter(reserve), len(groups), 0
        for _ in range(self.config.dynamic_sampling):
            slots = [i for i, g in enumerate(groups) if _all_equal(g[3])]
            fresh = list(itertools.islice(reserve, len(groups))) if slots else []
            if not fresh:
                break
            drawn += len(fresh)
            unequal = [g for g in self._draw(model, fresh, generator)[0] if not _all_equal(g[3])]
            for i, g in zip(slots, unequal):
                groups[i], replaced = g, replaced + 1
        return {"groups_drawn": drawn, "groups_replaced": replaced}

    def make_rollout(self, model, prompts, generator, reserve=()):
        c, G = self.config, self.config.num_generations
        groups, means = self._draw(model, prompts, generator)
        first = torch.cat([g[3] for g in groups])
        std = first.view(-1, G).std(dim=1)
        metrics = {"reward": float(first.mean()), **means, "reward_std": float(std.mean()),
                   "frac_reward_zero_std": float((std == 0).float().mean())}
        if c.dynamic_sampling:
            metrics.update(self._refill(model, groups, generator, reserve))
        rows, ids, texts = ([x for g in groups for x in g[k]] for k in range(3))
        rewards = torch.cat([g[3] for g in groups])
        table = rows_table([p.ids for p in rows], ids, self.pad_id)
        mask = table["labels"][:, 1:] != IGNORE
        if c.num_iterations > 1 or (c.algorithm == "rloo" and c.beta):
            table["old_logps"] = table_logps(model, table, c)
        if self.reference is not None:
            with self.reference.scope(model) as ref_model:
                table["ref_logps"] = table_logps(ref_model, table, c)
        shaped = rewards
        if c.algorithm == "rloo" and c.beta:  # the sequence's k1 KL, taken from its reward
            kl = ((table["old_logps"] - table["ref_logps"]) * mask).sum(-1)
            shaped = rewards - c.beta * kl
            metrics["kl"] = float(kl.mean())
        if c.algorithm == "rloo":
            advantages = rloo_advantages(shaped, G)
            if c.normalize_advantages:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
        else:
            advantages = group_advantages(shaped, G, c.scale)
        metrics.update({"completion_length": float(mask.sum(-1).float().mean()),
                        "clipped_completions": sum(len(i) == c.max_new_tokens and i[-1] not in self.stop_ids
                                                   for i in ids) / len(ids)})
        table.update(rewards=rewards, advantages=advantages.float())
        return table, texts, metrics


def train_rl(model: nn.Module, prompts, config: RLConfig, out, *, reward, tokenizer, stop_ids, pad_id: int = 0,
             reference=None, eval_prompts=None, resume: bool = False, on_step=None, data_files=None,
             options=None) -> list[dict]:
    """GRPO or RLOO (config.algorithm) on `prompts` (rollout.load_prompts) with `reward`
    (rewards.CombinedReward); returns the logged metrics. `reference` is a live reference object
    (dpo.make_reference) when config.beta > 0. Outputs, checkpoints and resume are those of sft.train;
    eval_prompts are answered greedily at the start, every eval_every steps and at the end."""
    check_group(config)
    task = RLTask(prompts, config, reward, tokenizer, stop_ids, pad_id, reference, eval_prompts)
    return run(task, model, out, resume=resume, on_step=on_step, data_files=data_files, options=options)
