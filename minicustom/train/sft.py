"""Supervised fine-tuning (SFT): next-token cross-entropy on the completion tokens of each example,

    L = - (1 / N) Σ_{trained tokens t} log p(y_t | y_<t),   N = the trained tokens of the global batch

with examples packed into rows (best-fit decreasing; each example attends only to itself). `SFTTask` is
what the loop (loop.py) needs to know of this objective; evaluation adds the eval loss, perplexity, and
greedy exact match on a few eval examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..data import IGNORE, Example, collate, pack, trained_tokens
from ..generate import generate
from ..losses import sft_loss
from ..model import eval_mode
from ..moe import SparseMoE, load_balancing_loss
from .loop import TrainConfig, run
from .state import examples_digest


def make_units(examples: list[Example], config: TrainConfig) -> list[list[int]]:
    """The rows of training: bins of packed examples, or single examples."""
    if config.packing:
        return pack([len(e) for e in examples], config.max_length)
    return [[i] for i in range(len(examples))]


class SFTLoss(nn.Module):
    """model + loss as one module, so that DDP and FSDP2 see the whole step in a forward call.

    A Mixture-of-Experts model adds coef * aux (moe.load_balancing_loss over this micro-batch's routers) per
    trained token, so that the step's loss, divided by its trained tokens, carries + coef * aux."""

    def __init__(self, model: nn.Module, chunk: int, aux_coef: float | None = None):
        super().__init__()
        c = model.config
        default = c.router_aux_loss_coef if c.output_router_logits else 0.0
        self.model, self.chunk = model, chunk
        self.aux_coef = (default if aux_coef is None else aux_coef) if c.num_experts else 0.0

    def forward(self, input_ids, labels, seq_ids=None, attention_mask=None):
        h = self.model.forward_hidden(input_ids, seq_ids=seq_ids, attention_mask=attention_mask)  # (B, T, C)
        loss, n = sft_loss(h, labels, self.model.head(), self.chunk)
        if not self.aux_coef:
            return loss, {}
        routers = [m.router_logits for m in self.model.modules() if isinstance(m, SparseMoE)]
        aux = load_balancing_loss(routers, self.model.config.num_experts_per_tok, attention_mask)
        return loss + self.aux_coef * aux * n, {"aux_loss": aux.detach() * n}  # the loop divides stats by tokens


class SFTTask:
    """What the loop needs to know of its objective, for SFT: the rows (packed examples), a micro-batch of
    rows, its weight (trained tokens: the loss of a step is a sum over them divided by their count), the
    loss module, and the eval metrics: the `Task` protocol (task.py), which DPO (dpo.py) answers for pairs."""

    weight_name = "trained_tokens"

    def __init__(self, examples: list[Example], config: TrainConfig, pad_id: int, eval_examples=None,
                 tokenizer=None, stop_ids=()):
        self.examples, self.config, self.pad_id = examples, config, pad_id
        self.eval_items, self.tokenizer, self.stop_ids = eval_examples or [], tokenizer, stop_ids
        self.units = make_units(examples, config)

    def batch(self, unit_ids: list[int], filler: bool = False) -> dict:
        batch = collate([[self.examples[i] for i in self.units[u]] for u in unit_ids], self.pad_id)
        if filler:  # an empty share of a distributed step: a forward and backward that contribute nothing
            batch["labels"].fill_(IGNORE)
        return batch

    def eval_batch(self, items: list[Example], filler: bool = False) -> dict:
        batch = collate([[e] for e in items], self.pad_id)
        if filler:
            batch["labels"].fill_(IGNORE)
        return batch

    weight = staticmethod(trained_tokens)

    def loss_module(self, model: nn.Module) -> nn.Module:
        return SFTLoss(model, self.config.loss_chunk, self.config.router_aux_loss_coef)

    def data_digest(self) -> str:
        return examples_digest(self.examples)

    def eval_metrics(self, loss_sum: float, weight: int, stats: dict) -> dict:
        return loss_metrics(loss_sum, weight)

    def answer_metrics(self, model) -> dict:
        """Greedy exact match on the first `exact_match` eval examples (needs the tokenizer)."""
        if self.tokenizer is None or not self.config.exact_match:
            return {}
        return {"exact_match": exact_match_rate(model, self.eval_items, self.config, self.pad_id, self.tokenizer,
                                                self.stop_ids)}


def loss_metrics(total: float, n: int) -> dict:
    """Mean loss per trained token and its perplexity (capped at e^50 so that a diverged run still logs)."""
    loss = total / max(n, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def exact_match_rate(model, examples: list[Example], config: TrainConfig, pad_id: int, tokenizer, stop_ids=()
                     ) -> float:
    """The fraction of the first `config.exact_match` examples whose greedy answer, stripped, equals the
    reference, stripped."""
    chosen = [e for e in examples if e.answer_start > 0][:config.exact_match]
    hits = 0
    with eval_mode(model):
        for i in range(0, len(chosen), config.batch_size):
            part = chosen[i:i + config.batch_size]
            prompts = [e.input_ids[:e.answer_start] for e in part]
            T = max(len(p) for p in prompts)  # prompts are left-padded to T; new tokens follow
            room = model.config.max_position_embeddings - T  # a prompt near the context leaves fewer new tokens
            out = generate(model, prompts, max(1, min(config.max_new_tokens, room)), stop=list(stop_ids),
                           pad_token_id=pad_id)
            for e, row in zip(part, out[:, T:].tolist()):
                answer = tokenizer.decode(row, skip_special_tokens=True)
                reference = tokenizer.decode([y for y in e.labels[e.answer_start:] if y != IGNORE],
                                             skip_special_tokens=True)
                hits += answer.strip() == reference.strip()
    return hits / max(len(chosen), 1)


def train(model: nn.Module, examples: list[Example], config: TrainConfig, out: str | Path, *,
          eval_examples: list[Example] | None = None, tokenizer=None, pad_id: int = 0, resume: bool = False,
          stop_ids=(), on_step: Callable[[int, dict], None] | None = None, data_files=None,
          options: dict | None = None) -> list[dict]:
    """Train the parameters of `model` that require grad on `examples`; returns the logged metrics.

    out/ receives metrics.jsonl, loss.csv, loss.png (with matplotlib) and checkpoints/: every save_every steps (None: a tenth of the
    run, at most 100 steps; 0: none) and at the end. Each records the run (see state.py): resume=True
    continues from out/checkpoints/latest, refusing another base model, other examples or another method,
    and applies and prints any changed TrainConfig field. data_files (the files the examples came from)
    and options (the method and its options, say) are recorded too. Ctrl-C stops at the next step
    boundary, saves a checkpoint and raises state.Interrupted (a KeyboardInterrupt). A non-finite loss
    stops the run with a TrainingError before the optimizer touches the weights; the last checkpoint
    stays as it was."""
    task = SFTTask(examples, config, pad_id, eval_examples, tokenizer, stop_ids)
    return run(task, model, out, resume=resume, on_step=on_step, data_files=data_files, options=options)
