"""PPO for language models in the InstructGPT form (Ouyang et al. 2022; Ziegler et al. 2019; Schulman
et al. 2017), as TRL's PPOTrainer and torchtune's PPO recipe compute it: the reference RLHF algorithm, in
which a reward model stands for the human feedback.

For each prompt x, one completion y ~ π_old is sampled and scored by the reward model, s = r(x, y). The
per-token reward folds in a KL penalty to the reference policy,

    r_t = −β (log π_old(y_t) − log π_ref(y_t))  +  [t = last token] · s

and a value head V on the policy's hidden states gives GAE advantages and returns (losses.gae, γ, λ),
whitened over the rollout's tokens. Then several epochs over the rollout in mini-batches minimize

    L = mean_t −min(ρ_t A_t, clip(ρ_t, 1 ± ε) A_t)  +  c_v · mean_t ½ max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²)

(losses.policy_loss with per-token advantages, losses.value_loss). The value head (zero-initialized) is
trained with the policy and saved in checkpoints, but not exported: the product is the policy.
Left out: a separate critic model, reward whitening, TRL's missing-EOS penalty, adaptive KL control.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data import IGNORE
from ..losses import clip_fraction, gae, policy_loss, token_logps, value_loss
from .loop import run
from .rollout import RolloutTask, SamplingConfig, over_rows, rows_table, sample, score, table_logps


@dataclass
class PPOConfig(SamplingConfig):
    """SamplingConfig plus PPO's coefficients. A rollout holds batch_size x grad_accum x processes x
    num_mini_batches prompts, one completion each; each of its num_ppo_epochs passes takes
    num_mini_batches optimizer steps."""

    temperature: float = 0.7
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    cliprange_value: float = 0.2
    vf_coef: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if self.beta is None:
            self.beta = 0.05  # TRL's kl_coef
        self.check({
            "num_ppo_epochs": (self.num_ppo_epochs >= 1, ">= 1"),
            "num_mini_batches": (self.num_mini_batches >= 1, ">= 1"),
            "gamma": (0 <= self.gamma <= 1, "in [0, 1]"),
            "lam": (0 <= self.lam <= 1, "in [0, 1]"),
            "cliprange_value": (self.cliprange_value > 0, "> 0"),
            "vf_coef": (self.vf_coef >= 0, ">= 0"),
        })


def whiten(x, mask):
    """(x − mean) / (std + 1e-8) over the masked entries (unbiased variance, as TRL's masked_whiten)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def explained_variance(values, returns, mask) -> float:
    """1 − Var(R − V) / Var(R) over the completion tokens: 1 is a perfect critic, ≤ 0 no better than a constant."""
    m = mask.bool()
    r, v = returns[m].double(), values[m].double()
    return float(1 - (r - v).var() / r.var()) if r.numel() > 1 and r.var() > 0 else float("nan")


class PPOLoss(nn.Module):
    """The policy's and the value head's forward over the rows, and PPO's two clipped losses, token means
    (the loop divides the sum by the step's completion tokens)."""

    def __init__(self, model: nn.Module, config: PPOConfig):
        super().__init__()
        self.model, self.config = model, config
        self.value_head = nn.Linear(model.config.hidden_size, 1, bias=False, dtype=torch.float32,
                                    device=model.model.embed_tokens.weight.device)
        nn.init.zeros_(self.value_head.weight)

    def values(self, h):
        """V at each position that predicts a completion token, (B, T - 1), like the log-probs."""
        return self.value_head(h[:, :-1].float()).squeeze(-1)

    def forward(self, input_ids, labels, advantages, returns, old_values, old_logps, weight, **_):
        c = self.config
        h = self.model.forward_hidden(input_ids)  # (B, T, C)
        logps = token_logps(h, labels, self.model.head(), c.loss_chunk, c.temperature)
        mask = labels[:, 1:] != IGNORE
        values = self.values(h)
        pg = policy_loss(logps, old_logps, advantages, mask, "bnpo", c.epsilon, c.epsilon_high)
        vf = value_loss(values, old_values, returns, mask, c.cliprange_value)
        w = weight.float()  # a token count, exact in fp32
        stats = {"policy_loss": pg.detach(), "value_loss": vf.detach(),
                 "clip_ratio": clip_fraction(logps.detach(), old_logps, advantages, mask, c.epsilon, c.epsilon_high),
                 "value_clip_ratio": (((values - old_values).abs() > c.cliprange_value) & mask).sum()
                 / mask.sum().clamp(min=1)}
        return (pg + c.vf_coef * vf) * w + h.sum() * 0.0, {k: v * w for k, v in stats.items()}


class PPOTask(RolloutTask):
    """PPO as a `Task` of the loop: a rollout of one completion per prompt, then num_ppo_epochs passes of
    num_mini_batches optimizer steps over it."""

    def __init__(self, model, prompts, config: PPOConfig, reward, tokenizer, stop_ids, pad_id, reference=None,
                 eval_prompts=None):
        super().__init__(prompts, config, reward, tokenizer, stop_ids, pad_id, reference, eval_prompts)
        self.updates = config.num_ppo_epochs * config.num_mini_batches
        self.loss = PPOLoss(model, config)

    def prompts_per_rollout(self, world: int) -> int:
        c = self.config
        return c.batch_size * c.grad_accum * world * c.num_mini_batches

    def step_rows(self, epoch: int, r: int, n_rows: int) -> list[list[int]]:
        """Each PPO epoch: the rollout's rows in a seeded order, cut into num_mini_batches mini-batches."""
        c, steps = self.config, []
        size = n_rows // c.num_mini_batches  # a rollout is always full (rollout.RolloutTask._rollouts)
        for e in range(c.num_ppo_epochs):
            g = torch.Generator().manual_seed(self._seed("ppo", epoch, r, e))
            order = torch.randperm(n_rows, generator=g).tolist()
            steps += [order[i:i + size] for i in range(0, n_rows, size)]
        return steps

    def weight_of(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss_module(self, model: nn.Module) -> nn.Module:
        return self.loss

    def make_rollout(self, model, prompts, generator, reserve=()):  # PPO draws no more
        c = self.config
        ids, texts = sample(model, self.tokenizer, prompts, c, self.stop_ids, self.pad_id, generator)
        scores, means = score(self.reward, self.tokenizer, prompts, ids, texts)
        table = rows_table([p.ids for p in prompts], ids, self.pad_id)
        mask = table["labels"][:, 1:] != IGNORE
        table["old_logps"] = table_logps(model, table, c)
        table["old_values"] = over_rows(model, table, c.batch_size, lambda h, _: self.loss.values(h)) * mask
        kl = torch.zeros_like(table["old_logps"])
        if self.reference is not None:
            with self.reference.scope(model) as ref_model:
                kl = (table["old_logps"] - table_logps(ref_model, table, c)) * mask
        rewards = -c.beta * kl
        last = mask.float().cumsum(1).argmax(1)  # the last completion token of each row
        rewards[torch.arange(len(ids)), last] += scores
        advantages, returns = gae(rewards, table["old_values"], mask, c.gamma, c.lam)
        table.update(advantages=whiten(advantages, mask), returns=returns, rewards=scores)
        metrics = {"reward": float(scores.mean()), **means, "kl": float(kl.sum(1).mean()),
                   "non_score_reward": float(rewards.sum(1).mean() - scores.mean()),
                   "completion_length": float(mask.sum(1).float().mean()),
                   "explained_variance": explained_variance(table["old_values"], returns, mask)}
        return table, texts, metrics


def train_ppo(model: nn.Module, prompts, config: PPOConfig, out, *, reward, tokenizer, stop_ids, pad_id: int = 0,
              reference=None, eval_prompts=None, resume: bool = False, on_step=None, data_files=None,
              options=None) -> list[dict]:
    """PPO on `prompts` with `reward` (rewards.CombinedReward, usually holding a reward model:
    rewards.ModelReward); `reference` a live reference (dpo.make_reference) when config.beta > 0. Returns
    the logged metrics; outputs, checkpoints and resume are those of sft.train."""
    task = PPOTask(model, prompts, config, reward, tokenizer, stop_ids, pad_id, reference, eval_prompts)
    return run(task, model, out, resume=resume, on_step=on_step, data_files=data_files, options=options)
