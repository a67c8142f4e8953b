"""Reward-model training: the Bradley–Terry loss on preference pairs, on the loop every objective shares.

Stiennon et al. 2020; Ouyang et al. 2022 (InstructGPT's reward model, one pair of each prompt's K
completions per row). For a prompt x with a chosen completion y_w and a rejected one y_l,

    L = -log sigma(r(x, y_w) - r(x, y_l) - m) + c (r(x, y_w) + r(x, y_l))^2         (losses.reward_loss)

with an optional per-pair margin m (Llama 2's: how much better y_w was rated; a `margin` field of the
data) and centering coefficient c (Eisenstein et al. 2023; TRL's center_rewards_coefficient), which keeps
the rewards near zero mean without changing their differences. The reward r is reward_model.RewardModel's
score of the sequence's last token. A batch of B pairs is one forward over 2B rows, the chosen rows
first (as DPO's: dpo.pair_batch); the weight of a batch is its pairs, so a step's loss is the mean over
the pairs of the global batch. The score head is trained whole whatever method sits underneath (PEFT's
modules_to_save): it is a trainable tensor of the loss module, so checkpoints hold it and resume it.
Metrics: loss, accuracy (r_w > r_l), margin (mean r_w - r_l), the mean chosen and rejected rewards,
and the mean and standard deviation of all rewards (from their sum and sum of squares).
Left out (and where to find it): InstructGPT's K-choose-2 grouping of a prompt's comparisons in one
batch, reward-model ensembles, TRL's padding-free batches.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data import PreferencePair, read_jsonl
from ..losses import reward_loss
from ..reward_model import RewardModel
from .dpo import pair_batch
from .loop import TrainConfig, run
from .state import examples_digest


@dataclass
class RMConfig(TrainConfig):
    """TrainConfig plus the reward loss's centering coefficient. batch_size counts pairs."""

    # Pairs are never packed: TrainConfig's switch is off, and left out of the run record (repr=False).
    packing: bool = field(default=False, repr=False)
    center_rewards_coefficient: float | None = None

    def __post_init__(self):
        super().__post_init__()
        c = self.center_rewards_coefficient
        if c is not None and not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
            raise ValueError(f"RMConfig.center_rewards_coefficient must be >= 0 and finite, or None, got {c!r}")


class RMLoss(nn.Module):
    """Reward-model forward over the 2B rows, the Bradley–Terry loss summed over the real pairs, and the
    metrics' sums (each per pair, so the loop's division by the pair count gives their means)."""

    def __init__(self, model: RewardModel, config: RMConfig):
        super().__init__()
        self.model, self.config = model, config

    def forward(self, input_ids, pair_mask, attention_mask=None, margin=None):
        r = self.model(input_ids, attention_mask=attention_mask)  # (2B,)
        B = pair_mask.shape[0]
        chosen, rejected = r[:B], r[B:]  # (B,), (B,)
        keep = pair_mask.bool()
        c = self.config.center_rewards_coefficient
        if keep.any():  # reward_loss is a mean over its pairs: times their count, the sum
            m = margin[keep] if margin is not None else None
            loss = reward_loss(chosen[keep], rejected[keep], m, c) * keep.sum()
        else:  # a filler share of a distributed step: a graph that contributes nothing
            loss = reward_loss(chosen, rejected, margin, c) * 0.0
        w = keep.float()
        both = (chosen + rejected) / 2
        stats = {"accuracy": (chosen > rejected).float(), "margin": chosen - rejected,
                 "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/mean": both,
                 "rewards/mean_sq": (chosen.square() + rejected.square()) / 2}
        return loss, {k: (v.detach().float() * w).sum() for k, v in stats.items()}


def reward_std(mean: float, mean_sq: float) -> float:
    """The (population) standard deviation of the rewards from their mean and mean square."""
    return math.sqrt(max(mean_sq - mean * mean, 0.0))


class RMTask:
    """Reward-model training as the loop (loop.run) sees it, the `Task` protocol (task.py): a unit is one
    pair, a batch B pairs as 2B rows (chosen first), its weight its pairs."""

    weight_name = "pairs"

    def __init__(self, pairs: list[PreferencePair], config: RMConfig, pad_id: int,
                 eval_pairs: list[PreferencePair] | None = None, margins=None, eval_margins=None):
        self.pairs, self.config, self.pad_id = pairs, config, pad_id
        self.eval_pairs = eval_pairs or []
        self.margins = _margins(margins, len(pairs), "margins")
        self.eval_margins = _margins(eval_margins, len(self.eval_pairs), "eval_margins")
        self.units = [[i] for i in range(len(pairs))]
        self.eval_items = list(range(len(self.eval_pairs)))

    def _batch(self, pairs, margins, indices, filler):
        batch = pair_batch([pairs[i] for i in indices], self.pad_id)
        del batch["labels"]  # the whole sequence is scored: no per-token targets
        batch["pair_mask"] = torch.full((len(indices),), 0 if filler else 1, dtype=torch.long)
        if margins is not None:
            batch["margin"] = margins[indices]  # (B,)
        return batch

    def batch(self, unit_ids: list[int], filler: bool = False) -> dict:
        return self._batch(self.pairs, self.margins, [self.units[u][0] for u in unit_ids], filler)

    def eval_batch(self, indices: list[int], filler: bool = False) -> dict:
        return self._batch(self.eval_pairs, self.eval_margins, indices, filler)

    @staticmethod
    def weight(batch: dict) -> int:
        return int(batch["pair_mask"].sum())

    def loss_module(self, model: nn.Module) -> nn.Module:
        return RMLoss(model, self.config)

    def data_digest(self) -> str:
        digest = examples_digest(e for p in self.pairs for e in (p.chosen, p.rejected))
        if self.margins is None:
            return digest
        return hashlib.sha256((digest + repr(self.margins.tolist())).encode()).hexdigest()

    def eval_metrics(self, loss_sum: float, weight: int, stats: dict) -> dict:
        n = max(weight, 1)
        means = {k: v / n for k, v in stats.items()}
        means["rewards/std"] = reward_std(means["rewards/mean"], means["rewards/mean_sq"])
        return {"eval_loss": loss_sum / n, **{f"eval_{k}": v for k, v in means.items()}}

    def answer_metrics(self, model) -> dict:
        return {}


def _margins(values, n: int, name: str) -> torch.Tensor | None:
    if values is None:
        return None
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.shape != (n,) or not torch.isfinite(t).all():
        raise ValueError(f"{name}: expected {n} finite numbers, one per pair; got shape {tuple(t.shape)}")
    return t


def pair_margins(path, pairs: list[PreferencePair]) -> list[float] | None:
    """The `margin` field of each pair's record in the JSONL file they were read from (None when no record
    has one); a file where some records have it must give it, a finite number, to every pair."""
    records = dict(read_jsonl(path))
    if not any("margin" in r for r in records.values()):
        return None
    margins = []
    for p in pairs:
        m = records[p.source].get("margin")
        if not (isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m)):
            raise ValueError(f"{p.source}: field 'margin' must be a finite number when other records of the file "
                             f"give one, found {m!r}")
        margins.append(float(m))
    return margins


def train_rm(model: RewardModel, pairs: list[PreferencePair], config: RMConfig, out, *,
             eval_pairs: list[PreferencePair] | None = None, pad_id: int | None = None, margins=None,
             eval_margins=None, resume: bool = False, on_step=None, data_files=None, options=None) -> list[dict]:
    """Train a RewardModel's head and the parameters of the model that require grad (a method attached
    first: LoRA, full, ...) on preference pairs; returns the logged metrics. The head is made trainable
    here. pad_id pads the rows (default: the model's pad_token_id); margins: one number per pair (or None).
    Outputs, checkpoints and resume are those of sft.train; the result is written by
    reward_model.save_reward_model."""
    if not isinstance(model, RewardModel):
        raise TypeError(f"train_rm trains a RewardModel (RewardModel.from_causal_lm, load_reward_model), got "
                        f"{type(model).__name__}")
    model.score.weight.requires_grad_(True)
    pad = model.config.pad_token_id if pad_id is None else pad_id
    task = RMTask(pairs, config, pad, eval_pairs, margins, eval_margins)
    return run(task, model, out, resume=resume, on_step=on_step, data_files=data_files, options=options)
