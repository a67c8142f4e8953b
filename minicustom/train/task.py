"""What the training loop needs to know of an objective: the `Task` protocol that SFT (sft.py), DPO
(dpo.py), KTO (kto.py), reward models (rm.py) and the RL trainers (rl.py, ppo.py) implement. The loop
never looks inside a batch; it asks the task.

Optional members, which the online RL tasks (rollout.RolloutTask) add:
    epoch_plan(epoch, world) -> the units of each step of an epoch (default: loop.epoch_steps' shuffle)
    before_step(job) -> metrics: runs before each step (samples a rollout when one is due)
    state() -> tensors saved with each checkpoint; load_state(tensors) on resume (the rollout in use)
    evaluate(model) -> eval metrics, in place of the eval batches' loss (held-out prompts answered)
    step_metrics(stats) -> a step's metrics from its statistics summed and divided by the weight (KTO's
        per-label means, which need their own counts)
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn


class Task(Protocol):
    config: Any  # a TrainConfig (or a subclass: DPOConfig)
    units: list  # the rows of training: the loop shuffles their indices and cuts steps from them
    eval_items: list  # held-out items for evaluate_objective (may be empty)
    weight_name: str  # what the weight counts, as logged ("trained_tokens", "pairs")

    def batch(self, unit_ids: list[int], filler: bool = False) -> dict:
        """The collated micro-batch of these units; filler: a batch that contributes nothing (an empty share
        of a distributed step, which must still run a forward and backward)."""

    def eval_batch(self, items: list, filler: bool = False) -> dict: ...

    @staticmethod
    def weight(batch: dict) -> int:
        """What the batch's summed loss is divided by, summed over the step (trained tokens, pairs)."""

    def loss_module(self, model: nn.Module) -> nn.Module:
        """model + loss as one module: forward(**batch) -> (summed loss, {statistic: summed value})."""

    def data_digest(self) -> str:
        """A hash of what is trained on: a resume with other data is refused."""

    def eval_metrics(self, loss_sum: float, weight: int, stats: dict) -> dict: ...

    def answer_metrics(self, model: nn.Module) -> dict:
        """Metrics that need generation (greedy exact match), on process 0."""
