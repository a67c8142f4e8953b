"""Kahneman-Tversky Optimization: alignment from unpaired thumbs-up / thumbs-down feedback.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 7. Each record is one
completion y of a prompt x with a label: desirable or undesirable. With the implicit reward
r(x, y) = log pi_theta(y|x) - log pi_ref(y|x) and a reference point z0,

    desirable:    L = w_d (1 - sigma(beta (r(x, y) - z0)))
    undesirable:  L = w_u (1 - sigma(beta (z0 - r(x, y))))          (losses.kto_loss)

z0 is the batch's estimate of KL(pi_theta || pi_ref), taken as TRL 1.16 takes it (kto_trainer.py:1141-1156,
1443-1444): each micro-batch of B examples gets B mismatched rows, the prompt of example i with the
completion of example i - 1 (example 0 with the last one's: (x_1, y_B), (x_2, y_1), ..., (x_B, y_{B-1})),
z0 = mean over them of log pi_theta - log pi_ref (losses.kto_kl), detached, averaged over the processes under
torchrun before the clamp at 0. TRL rotates fixed chunks of a dataset it never shuffles; here the rotation is
made within each shuffled micro-batch, which pairs the same way (a KL row may meet its own prompt's other
completion when both halves of a split pair share a micro-batch, as TRL's does at a chunk boundary). The KL
rows run under no_grad, as TRL's: z0 carries no gradient. A micro-batch of one example (the end of an epoch)
is its own KL row, as TRL's last chunk is; batch_size must be at least 2 (TRL refuses 1 as well).

The loss of a step is the mean over its examples (desirable and undesirable alike, each weighted by w_d or
w_u; TRL: losses.nanmean() of the concatenated losses), however the step is split into micro-batches and
processes. The reference pi_ref is always named, as in DPO (dpo.make_reference: 'base', 'snapshot', a
folder): KTO has no reference-free form (at beta 0 its loss is the constant w/2).

Data: TRL's unpaired format, prompt/completion/label (label a JSON bool), or preference pairs split into a
desirable and an undesirable record (TRL's unpair_preference_dataset); one file holds one of the two (a mix
is refused, as a TRL dataset has one set of columns). A paired eval file also gives the preference
accuracy: the share of pairs whose chosen completion has the higher implicit reward; its batches hold P
pairs as 2P rows, chosen first, whose KL rows rotate over all 2P (one pair alone meets its own prompt).
Metrics (TRL's names): loss, kl, rewards/chosen and rewards/rejected (beta r, mean over the desirable /
undesirable examples), rewards/margins, logps/chosen, logps/rejected; eval: the same, and for pairs
rewards/accuracies and policy_accuracy (log pi_theta(y_w|x) > log pi_theta(y_l|x), meaningful at step 0,
where a policy equal to its reference ties every reward).

Left out (and where to find it): TRL's apo_zero_unpaired loss, precomputed reference log-probs (the KL rows
change with every shuffle), the KTO paper's weight recommendations (TRL's warning), padding-free batches.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..data import (
    IGNORE,
    DataError,
    Example,
    PreferencePair,
    collate,
    load_preferences,
    make_example,
    read_jsonl,
)
from ..losses import kto_kl, kto_loss, sequence_logps
from .dpo import make_reference
from .loop import TrainConfig, run
from .state import examples_digest

# -- unpaired data -----------------------------------------------------------------------------------


@dataclass
class Unpaired:
    """One completion with its label. The prompt and the completion are kept apart so that the KL rows
    can join a prompt with another example's completion."""

    prompt: list[int]  # token ids before the first trained token (BOS, chat template's prompt turns)
    completion: list[int]  # the remaining token ids, EOS / end-of-turn included
    labels: list[int]  # the completion's labels: its ids, IGNORE where not trained (text after end-of-turn)
    desirable: bool
    source: str  # "file:line"

    def row(self, completion_of: Unpaired | None = None, max_length: int | None = None) -> Example:
        """prompt + this completion (or another example's: a KL row), cut to max_length (the start kept)."""
        other = completion_of or self
        ids, labels = self.prompt + other.completion, [IGNORE] * len(self.prompt) + other.labels
        return Example(ids[:max_length], labels[:max_length], self.source)


def unpaired(example: Example, desirable: bool) -> Unpaired:
    """Split a whole Example (prompt + completion, completion trained) at its first trained token."""
    start = next(t for t, y in enumerate(example.labels) if y != IGNORE)
    return Unpaired(example.input_ids[:start], example.input_ids[start:], example.labels[start:], desirable,
                    example.source)


def split_pairs(pairs: list[PreferencePair]) -> list[Unpaired]:
    """Each pair -> its chosen completion (desirable), then its rejected one (undesirable), in file order."""
    return [u for p in pairs for u in (unpaired(p.chosen, True), unpaired(p.rejected, False))]


def _kind(record: dict) -> str:
    return "paired" if "chosen" in record or "rejected" in record else "unpaired"


def feedback_format(path, records=None) -> str:
    """'paired' (prompt/chosen/rejected, or chosen/rejected) or 'unpaired' (prompt/completion/label). A file
    holds one or the other: a record of the other kind is refused, naming both lines."""
    records = records if records is not None else read_jsonl(path)
    first_where, first = records[0]
    for where, record in records:
        if _kind(record) != _kind(first):
            raise DataError(f"{where}: a {_kind(record)} record (fields {sorted(record)}) in a file whose first "
                            f"record ({first_where}) is {_kind(first)}: a KTO file holds unpaired records "
                            "(prompt/completion/label) or preference pairs (prompt/chosen/rejected), not both")
    return _kind(first)


def _label(record: dict, where: str) -> bool:
    missing = [k for k in ("prompt", "completion", "label") if k not in record]
    if missing:
        raise DataError(f"{where}: an unpaired record needs 'prompt', 'completion' and 'label'; field "
                        f"{missing[0]!r} is missing (the record has {sorted(record)})")
    if type(record["label"]) is not bool:
        raise DataError(f"{where}: field 'label' must be true or false (a JSON bool: true for a desirable "
                        f"completion), got {record['label']!r} ({type(record['label']).__name__})")
    return record["label"]


def _checked(ex: Example, vocab_size: int | None, where: str) -> Example:
    if vocab_size is not None and max(ex.input_ids) >= vocab_size:
        raise DataError(f"{where}: token id {max(ex.input_ids)} is outside the model's vocabulary of "
                        f"{vocab_size}: the tokenizer does not belong to this model")
    if ex.trained == 0:
        raise DataError(f"{where}: no trained token (every label is masked); check the record's fields")
    return ex


def check_balance(items: list[Unpaired], where, dropped: int = 0):
    """KTO needs both kinds of feedback: refuse a set without a desirable or without an undesirable example."""
    good = sum(u.desirable for u in items)
    if good == 0 or good == len(items):
        after = f" (after {dropped} too long were dropped)" if dropped else ""
        raise DataError(f"{where}: {good} desirable and {len(items) - good} undesirable examples{after}; KTO needs "
                        "both (label true and label false), or preference pairs, which give one of each")


def load_unpaired(path, tokenizer, max_length: int | None = None, truncation: str = "truncate", chat: bool = False,
                  vocab_size: int | None = None, report=print) -> list[Unpaired]:
    """Read a JSONL file of unpaired records, or of preference pairs (each split in two: split_pairs).
    prompt/completion are strings or message lists (as make_example takes them); string records go
    through the chat template with chat=True. An example longer than max_length is cut ("truncate",
    keeping the start; dropped if no completion token is left) or left out ("drop"); counts are reported."""
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    records = read_jsonl(path)
    if feedback_format(path, records) == "paired":
        items = split_pairs(load_preferences(path, tokenizer, max_length, truncation, chat, vocab_size, report))
        check_balance(items, path)
        return items
    items, cut, dropped = [], 0, 0
    for where, record in records:
        desirable = _label(record, where)
        ex = _checked(make_example({"prompt": record["prompt"], "completion": record["completion"]}, tokenizer,
                                   where, chat=chat), vocab_size, where)
        if max_length is not None and len(ex) > max_length:
            if truncation == "drop" or all(y == IGNORE for y in ex.labels[:max_length]):
                dropped += 1
                continue
            ex, cut = Example(ex.input_ids[:max_length], ex.labels[:max_length], where), cut + 1
        items.append(unpaired(ex, desirable))
    if cut or dropped:
        report(f"{path}: {cut} examples longer than {max_length} tokens truncated, {dropped} dropped")
    if not items:
        raise DataError(f"{path}: no example left (all {dropped} were longer than max_length {max_length})")
    check_balance(items, path, dropped)
    return items


# -- the objective -----------------------------------------------------------------------------------

@dataclass
class KTOConfig(TrainConfig):
    """TrainConfig plus KTO's beta and class weights. batch_size counts examples (>= 2: the KL rows)."""

    lr: float = 5e-5  # for adapters, as DPOConfig; full fine-tuning wants far less (TRL's default is 1e-6)
    packing: bool = field(default=False, repr=False)  # examples are never packed
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
        if not (finite(self.beta) and self.beta > 0):
            raise ValueError(f"KTOConfig.beta must be > 0 and finite, got {self.beta!r}: at beta 0 the KTO loss is "
                             "a constant (w/2) and nothing trains; KTO has no reference-free form")
        for name in ("desirable_weight", "undesirable_weight"):
            if not (finite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"KTOConfig.{name} must be >= 0 and finite, got {getattr(self, name)!r}")
        if self.desirable_weight == self.undesirable_weight == 0:
            raise ValueError("KTOConfig.desirable_weight and undesirable_weight are both 0: nothing would train")
        if self.batch_size < 2:
            raise ValueError(f"KTOConfig.batch_size must be >= 2, got {self.batch_size}: the KL estimate pairs each "
                             "prompt with another example's completion of the same micro-batch (TRL refuses 1 too)")


def reference_point(policy_kl_logps, ref_kl_logps, real: bool = True) -> torch.Tensor:
    """z0 of a micro-batch: kto_kl on one process; under torchrun the mean over the processes of each
    one's batch estimate, then the clamp at 0 (TRL: accelerator.gather_for_metrics(kl).mean().clamp(min=0));
    the filler share of a short last step (real=False) is left out of the mean."""
    if not dist.is_initialized():
        return kto_kl(policy_kl_logps, ref_kl_logps)
    local = (policy_kl_logps - ref_kl_logps).mean().detach().float()
    both = torch.stack([local * float(real), torch.full_like(local, float(real))])
    dist.all_reduce(both)
    return (both[0] / both[1].clamp(min=1)).clamp(min=0)


def kto_batch(items: list[Unpaired], pad_id: int, max_length: int | None = None, filler: bool = False,
              pairs: int = 0) -> dict:
    """B examples -> their rows, and the B KL rows: prompt i with completion i - 1, prompt 0 with the last
    (TRL's [y_B, y_1, ..., y_{B-1}]), cut to max_length as TRL's collator cuts them. pairs=P: the first 2P
    items are P chosen then P rejected completions, compared in the eval's preference accuracy."""
    batch = collate([[u.row()] for u in items], pad_id)
    kl = collate([[u.row(items[i - 1], max_length)] for i, u in enumerate(items)], pad_id)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    batch["desirable"] = torch.tensor([u.desirable for u in items], dtype=torch.long)
    batch["row_mask"] = torch.full((len(items),), 0 if filler else 1, dtype=torch.long)
    if pairs:
        batch["pair_mask"] = torch.full((pairs,), 0 if filler else 1, dtype=torch.long)
    return batch


class KTOLoss(nn.Module):
    """Reference log-probs of the rows and of the KL rows, the policy's KL rows without a graph (z0), then the
    policy's rows; returns the summed KTO loss of the real examples and the metrics' sums and counts."""

    def __init__(self, model: nn.Module, reference, config: KTOConfig):
        super().__init__()
        self.model, self.reference, self.config = model, reference, config

    def _logps(self, input_ids, labels, attention_mask):
        h = self.model.forward_hidden(input_ids, attention_mask=attention_mask)  # (B, T, C)
        return sequence_logps(h, labels, self.model.head(), self.config.loss_chunk)[0]  # (B,)

    def forward(self, input_ids, labels, kl_input_ids, kl_labels, desirable, row_mask, attention_mask=None,
                kl_attention_mask=None, pair_mask=None):
        c = self.config
        # the reference first: a snapshot swaps the policy's tensors, which must be back before its graph
        ref = self.reference(self.model, input_ids, labels, attention_mask, c.loss_chunk)  # (B,)
        ref_kl = self.reference(self.model, kl_input_ids, kl_labels, kl_attention_mask, c.loss_chunk)  # (B,)
        with torch.no_grad():
            kl_logps = self._logps(kl_input_ids, kl_labels, kl_attention_mask)  # (B,)
        z0 = reference_point(kl_logps, ref_kl, real=bool(row_mask.any()))
        logps = self._logps(input_ids, labels, attention_mask)  # (B,)
        good = desirable.bool()
        out = kto_loss(logps, ref, good, z0, c.beta, c.desirable_weight, c.undesirable_weight)
        m = row_mask.to(out.losses.dtype)
        d, u, lp = m * good, m * ~good, logps.detach()
        stats = {"sum/kl": z0 * m.sum(), "sum/rewards/chosen": (out.rewards * d).sum(),
                 "sum/rewards/rejected": (out.rewards * u).sum(), "sum/logps/chosen": (lp * d).sum(),
                 "sum/logps/rejected": (lp * u).sum(), "count/chosen": d.sum(), "count/rejected": u.sum()}
        if pair_mask is not None:
            P, pm = pair_mask.shape[0], pair_mask.to(m.dtype)
            stats["sum/rewards/accuracies"] = ((out.rewards[:P] > out.rewards[P:2 * P]).to(m.dtype) * pm).sum()
            stats["sum/policy_accuracy"] = ((lp[:P] > lp[P:2 * P]).to(m.dtype) * pm).sum()
            stats["count/pairs"] = pm.sum()
        return (out.losses * m).sum(), {k: v.detach().float() for k, v in stats.items()}


def kto_metrics(stats: dict) -> dict:
    """The metrics from the sums and counts (summed over a step or an eval, or all divided by one weight:
    only their ratios are read). A mean over no example (a step without undesirable ones) is left out."""
    out = {}
    n = stats["count/chosen"] + stats["count/rejected"]
    if n:
        out["kl"] = stats["sum/kl"] / n
    for name, side in (("chosen", "chosen"), ("rejected", "rejected")):
        if stats[f"count/{side}"]:
            for key in ("rewards", "logps"):
                out[f"{key}/{name}"] = stats[f"sum/{key}/{name}"] / stats[f"count/{side}"]
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    if stats.get("count/pairs"):
        out["rewards/accuracies"] = stats["sum/rewards/accuracies"] / stats["count/pairs"]
        out["policy_accuracy"] = stats["sum/policy_accuracy"] / stats["count/pairs"]
    return out


class KTOTask:
    """KTO as the loop (loop.run) sees it, the `Task` protocol (task.py): a unit is one example, the weight
    of a batch its number of examples (the loss is the mean over the examples of the global batch). Eval
    items are unpaired examples, or pairs (2 rows each, chosen first) for the preference accuracy."""

    weight_name = "examples"

    def __init__(self, examples: list[Unpaired], config: KTOConfig, reference, pad_id: int = 0,
                 eval_examples: list[Unpaired] | None = None, eval_pairs: list[PreferencePair] | None = None):
        if eval_examples and eval_pairs:
            raise ValueError("pass eval_examples (unpaired) or eval_pairs (for the preference accuracy), not both")
        self.examples, self.config, self.reference, self.pad_id = examples, config, reference, pad_id
        self.eval_examples = eval_examples or []
        self.eval_pairs = [(unpaired(p.chosen, True), unpaired(p.rejected, False)) for p in eval_pairs or []]
        self.units = [[i] for i in range(len(examples))]
        self.eval_items = list(range(len(self.eval_pairs or self.eval_examples)))

    def batch(self, unit_ids: list[int], filler: bool = False) -> dict:
        return kto_batch([self.examples[self.units[u][0]] for u in unit_ids], self.pad_id, self.config.max_length,
                         filler)

    def eval_batch(self, indices: list[int], filler: bool = False) -> dict:
        if not self.eval_pairs:
            return kto_batch([self.eval_examples[i] for i in indices], self.pad_id, self.config.max_length, filler)
        pairs = [self.eval_pairs[i] for i in indices]
        return kto_batch([c for c, _ in pairs] + [r for _, r in pairs], self.pad_id, self.config.max_length,
                         filler, pairs=len(pairs))

    @staticmethod
    def weight(batch: dict) -> int:
        return int(batch["row_mask"].sum())

    def loss_module(self, model: nn.Module) -> nn.Module:
        return KTOLoss(model, self.reference, self.config)

    def data_digest(self) -> str:
        labels = hashlib.sha256(bytes(u.desirable for u in self.examples)).hexdigest()
        return examples_digest(u.row() for u in self.examples) + ":" + labels[:16]

    def step_metrics(self, stats: dict) -> dict:
        """A step's record from its sums divided by the weight (the loop's stats): TRL's means."""
        return kto_metrics(stats)

    def eval_metrics(self, loss_sum: float, weight: int, stats: dict) -> dict:
        return {"eval_loss": loss_sum / max(weight, 1), **{f"eval_{k}": v for k, v in kto_metrics(stats).items()}}

    def answer_metrics(self, model) -> dict:
        return {}


def train_kto(model: nn.Module, examples: list[Unpaired], config: KTOConfig, out, *, reference=None,
              eval_examples: list[Unpaired] | None = None, eval_pairs: list[PreferencePair] | None = None,
              pad_id: int = 0, resume: bool = False, on_step=None, data_files=None, options=None) -> list[dict]:
    """Train the parameters of `model` that require grad with KTO on unpaired examples (load_unpaired);
    returns the logged metrics. `reference` must be named: 'base' (adapters disabled), 'snapshot' (the
    starting trainable tensors, frozen), a checkpoint folder or a model. eval_pairs (load_preferences)
    add the held-out preference accuracy. Outputs, checkpoints and resume are those of sft.train."""
    if reference is None or (isinstance(reference, str) and reference == "precomputed"):
        why = ("its KL rows change with every shuffled batch, so their reference log-probs cannot be computed "
               "once" if reference else "KTO compares the policy with a reference policy")
        raise ValueError(f"reference {reference!r}: {why}; pass reference='base' (adapters disabled), 'snapshot' "
                         "(the starting trainable tensors, frozen), a checkpoint folder or a model")
    check_balance(examples, examples[0].source.rsplit(":", 1)[0] if examples else "the examples")
    task = KTOTask(examples, config, make_reference(model, reference), pad_id, eval_examples, eval_pairs)
    return run(task, model, out, resume=resume, on_step=on_step, data_files=data_files, options=options)

