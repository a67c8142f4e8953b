"""Rollouts for the online RL trainers (rl.py: GRPO and RLOO; ppo.py: PPO): prompts from a JSONL file,
completions sampled from the policy with the KV-cache sampler, their rewards, and the log-probs the
losses compare against, held as one padded table of rows.

A row is a prompt followed by one sampled completion (up to and including its stop token), right-padded;
its labels are the completion's tokens and -100 elsewhere, so the losses' per-token log-probs (B, T - 1)
line up with labels[:, 1:]. A rollout is sampled with a generator seeded by (seed, epoch, rollout), not
by a running RNG, so a resumed run samples what the uninterrupted one did; the rollout in use is saved
with each checkpoint (RolloutTask.state), since a checkpoint may fall between the optimizer steps that
reuse it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data import IGNORE, DataError, read_jsonl
from ..generate import generate
from ..losses import token_logps
from ..model import PromptKV, eval_mode
from ..prompting import completion_text, render
from ..rewards import CombinedReward
from .loop import TrainConfig


@dataclass
class SamplingConfig(TrainConfig):
    """What GRPO, RLOO and PPO share beyond TrainConfig: the sampler, the ratio's clip, the KL coefficient.
    max_new_tokens caps a completion; max_length caps prompt + completion."""

    lr: float = 1e-5
    packing: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    epsilon: float = 0.2  # the ratio's clip, [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # DAPO's clip-higher; None: epsilon
    beta: float | None = None  # the KL coefficient; None: the algorithm's default
    log_completions: int = 10  # print a rollout's first completions every N rollouts (0: never)

    def check(self, extra: dict):
        """TrainConfig's checks, the sampler's, and `extra` (name -> (holds, what it must be))."""
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
        checks = {
            "temperature": (finite(self.temperature) and self.temperature > 0, "> 0 and finite (sampling)"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "top_k": (self.top_k is None or self.top_k >= 1, ">= 1, or None"),
            "epsilon": (0 < self.epsilon < 1, "in (0, 1)"),
            "epsilon_high": (self.epsilon_high is None or finite(self.epsilon_high) and self.epsilon_high > 0,
                             "> 0, or None (= epsilon)"),
            "beta": (finite(self.beta) and self.beta >= 0, ">= 0 and finite"),
            "log_completions": (self.log_completions >= 0, ">= 0"),
            "max_new_tokens": (self.max_new_tokens < self.max_length, f"below max_length ({self.max_length}): the "
                               "prompt needs room"),
            **extra,
        }
        for name, (holds, expected) in checks.items():
            if not holds:
                raise ValueError(f"{type(self).__name__}.{name} must be {expected}, got {getattr(self, name)!r}")


@dataclass
class Prompt:
    ids: list[int]
    record: dict  # the JSONL record: the reward functions see it (its `answer`, say)
    source: str  # file:line


def prompt_messages(record: dict, where: str):
    """A record's prompt: `prompt` (a string or a message list), or `messages` without the trailing
    assistant turn(s) (an SFT record: its answer is the reference, not part of the prompt)."""
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str) and prompt or isinstance(prompt, list) and prompt:
            return prompt
        raise DataError(f"{where}: field 'prompt' must be a non-empty string or message list")
    messages = record.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: an RL prompt record needs 'prompt' (a string or message list) or 'messages'; "
                        f"the record has {sorted(record)}")
    while messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1].get("role") != "user":
        raise DataError(f"{where}: field 'messages' must end with a user turn (after any assistant answer)")
    return messages


def load_prompts(path, tokenizer, max_prompt_length: int, report=print) -> list[Prompt]:
    """The prompts of a JSONL file, rendered with the chat template (message lists) or encoded as they are
    (strings). A prompt longer than max_prompt_length tokens is left out, with a count reported."""
    prompts, dropped = [], 0
    for where, record in read_jsonl(path):
        messages = prompt_messages(record, where)
        ids = tokenizer.encode(messages) if isinstance(messages, str) else render(tokenizer, messages)
        if len(ids) > max_prompt_length:
            dropped += 1
            continue
        prompts.append(Prompt(list(ids), record, where))
    if dropped:
        report(f"{path}: {dropped} prompts longer than {max_prompt_length} tokens left out")
    if not prompts:
        raise DataError(f"{path}: no prompt left (max_prompt_length {max_prompt_length}, {dropped} longer)")
    return prompts


def prompts_digest(prompts: Sequence[Prompt]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in prompts:
        h.update(repr((p.ids, sorted(p.record.items(), key=str))).encode())
    return h.hexdigest()


def rows_table(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Prompt + completion rows, right-padded: input_ids and labels (N, L), the completion tokens trained."""
    L = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), L), IGNORE, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


def prompt_runs(input_ids, labels) -> list[tuple[int, int, int]] | None:
    """(first row, end row, prompt length P) of each run of consecutive rows that share their prompt (the
    tokens before the first trained one); None when no prompt is shared or a row trains no token."""
    trained = labels != IGNORE  # (B, T)
    if not bool(trained.any(1).all()):
        return None
    P = trained.int().argmax(1).tolist()  # (B,) the first trained position: the prompt's length
    runs = [[0, 1, P[0]]]
    for i in range(1, len(P)):
        if P[i] == runs[-1][2] and torch.equal(input_ids[i, :P[i]], input_ids[i - 1, :P[i]]):
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, P[i]])
    return [tuple(r) for r in runs] if len(runs) < len(P) else None


def rows_hidden(model: nn.Module, input_ids, labels) -> torch.Tensor:
    """model.forward_hidden(input_ids) (B, T, C) for rows of a prompt and a completion, each shared prompt
    run once (model.PromptKV) for the rows after it: for the demo's 8 samples of a ~70-token prompt and
    64-token completions, 46% fewer tokens and a 1.42x faster update (benchmarks/bench_grpo.py). Equal up to rounding (the sums are grouped differently); dropout,
    where a method has it, is drawn once for a prompt's rows. Where nothing is shared, or the model has
    a prefix or recomputes its layers (gradient checkpointing), the rows run as they are."""
    runs = prompt_runs(input_ids, labels)
    recomputes = model.gradient_checkpointing and model.training and torch.is_grad_enabled()
    if runs is None or model.kv_prefix is not None or recomputes:
        return model.forward_hidden(input_ids)
    parts = []
    for start, end, P in runs:
        kv = PromptKV()
        prompt = model.forward_hidden(input_ids[start:start + 1, :P], kv_cache=kv)  # (1, P, C)
        rest = model.forward_hidden(input_ids[start:end, P:], kv_cache=kv.join())  # (n, T - P, C)
        parts.append(torch.cat([prompt.expand(end - start, -1, -1), rest], dim=1))  # (n, T, C)
    return torch.cat(parts)  # (B, T, C)


@torch.no_grad()
def over_rows(model: nn.Module, table: dict, batch_size: int, fn) -> torch.Tensor:
    """fn(hidden states, row slice) over the table's rows, batch_size at a time, in eval mode (no dropout),
    on CPU."""
    device = model.model.embed_tokens.weight.device
    input_ids, labels = table["input_ids"], table["labels"]
    with eval_mode(model):
        return torch.cat([fn(rows_hidden(model, input_ids[i:i + batch_size].to(device), labels[i:i + batch_size]),
                             slice(i, i + batch_size)).cpu() for i in range(0, input_ids.shape[0], batch_size)])


def table_logps(model: nn.Module, table: dict, config) -> torch.Tensor:
    """Per-token log-probs (N, L - 1) of the table's completions under `model`, at the sampling temperature."""
    labels = table["labels"]
    return over_rows(model, table, config.batch_size, lambda h, rows: token_logps(
        h, labels[rows].to(h.device), model.head(), config.loss_chunk, config.temperature))


@torch.no_grad()
def sample(model, tokenizer, prompts: list[Prompt], config, stop_ids, pad_id: int, generator=None,
           greedy: bool = False) -> tuple[list[list[int]], list[str]]:
    """One completion per prompt (repeat a prompt for several): its ids up to and including the first stop
    token, and its text (special tokens left out)."""
    with eval_mode(model):
        out = generate(model, [p.ids for p in prompts], config.max_new_tokens,
                       temperature=0.0 if greedy else config.temperature, top_k=None if greedy else config.top_k,
                       top_p=None if greedy else config.top_p, stop=list(stop_ids), pad_token_id=pad_id,
                       generator=generator)
    T, stops, ids = max(len(p.ids) for p in prompts), set(stop_ids), []
    for row in out[:, T:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        ids.append(row[:end])
    return ids, [completion_text(tokenizer, c, stop_ids) for c in ids]


def score(reward: CombinedReward, tokenizer, prompts: list[Prompt], ids: list[list[int]], texts: list[str]
          ) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted reward of each completion (N,), and each source's mean (logged as reward/<name>)."""
    prompt_texts = [tokenizer.decode(p.ids) for p in prompts]
    parts = reward.parts(prompt_texts, texts, [p.record for p in prompts],
                         token_rows=[p.ids + c for p, c in zip(prompts, ids)])
    total = torch.zeros(len(ids), dtype=torch.float64)
    for (name, _), w in zip(reward.sources, reward.weights):
        total += w * torch.tensor(parts[name], dtype=torch.float64)
    return total.float(), {f"reward/{name}": sum(v) / len(v) for name, v in parts.items()}


def evaluate_prompts(model, tokenizer, prompts: list[Prompt], reward: CombinedReward, config, stop_ids,
                     pad_id: int, batch_size: int = 16) -> dict:
    """Greedy completions of held-out prompts and their mean reward (for a 0/1 verifiable reward: the
    accuracy), per source too."""
    sums, totals = {}, []
    for i in range(0, len(prompts), batch_size):
        part = prompts[i:i + batch_size]
        ids, texts = sample(model, tokenizer, part, config, stop_ids, pad_id, greedy=True)
        values, means = score(reward, tokenizer, part, ids, texts)
        totals += values.tolist()
        for k, v in means.items():
            sums[k] = sums.get(k, 0.0) + v * len(part)
    n = len(prompts)
    return {"eval_reward": sum(totals) / n, **{f"eval_{k}": v / n for k, v in sums.items()}}


class RolloutTask:
    """What GRPO, RLOO and PPO share as `Task`s (task.py) of the loop: the prompts, the plan of optimizer
    steps over rollouts (each rollout reused by `updates` steps), the current rollout (sampled in
    before_step, saved with checkpoints), the micro-batches cut from it, and held-out evaluation. A
    subclass says how many prompts a rollout takes, how its steps cut it, what a batch weighs, how a
    rollout is made, and the loss module."""

    weight_name = "weight"
    updates: int  # optimizer steps per rollout

    def __init__(self, prompts: list[Prompt], config, reward: CombinedReward, tokenizer, stop_ids, pad_id: int,
                 reference=None, eval_prompts: list[Prompt] | None = None):
        if config.beta and reference is None:
            raise ValueError(f"beta {config.beta} weighs the KL to a reference policy: name it (base, snapshot or a "
                             "model folder), or set beta 0")
        self.prompts, self.config, self.reward, self.tokenizer = prompts, config, reward, tokenizer
        self.stop_ids, self.pad_id, self.reference = list(stop_ids), pad_id, reference if config.beta else None
        self.eval_items = eval_prompts or []
        self.units = list(range(len(prompts)))
        self.rollout, self.rollout_key, self.rollout_texts, self._orders = None, None, [], {}

    def prompts_per_rollout(self, world: int) -> int:
        raise NotImplementedError

    def step_rows(self, epoch: int, r: int, n_rows: int) -> list[list[int]]:
        """The rows of the rollout each of its `updates` steps trains on."""
        raise NotImplementedError

    def weight_of(self, batch: dict) -> int:
        """What a micro-batch's summed loss is divided by, summed over the step (task.Task.weight)."""
        raise NotImplementedError

    def make_rollout(self, model, prompts: list[Prompt], generator, reserve: Iterable[Prompt] = ()
                     ) -> tuple[dict, list[str], dict]:
        """(the table of rows: tensors (N, L), (N, L - 1) or (N,); the completions' texts; metrics).
        `reserve`: the other prompts, in a seeded order, for a rollout that draws more (dynamic sampling)."""
        raise NotImplementedError

    # -- the plan -------------------------------------------------------------------------------------
    def _seed(self, *parts: int) -> int:
        """A seed for each use (the prompt order, a rollout's sampler, a PPO epoch's order), from the run's."""
        return int.from_bytes(hashlib.blake2b(repr((self.config.seed, *parts)).encode(), digest_size=8).digest(),
                              "little") >> 1

    def _rollouts(self, epoch: int, world: int) -> list[list[int]]:
        """The prompt indices of each rollout of an epoch, in a seeded order; a last rollout too short to be
        full is left out (the next epoch's order differs, so no prompt is always the one left out)."""
        if (epoch, world) not in self._orders:
            P = self.prompts_per_rollout(world)
            if len(self.prompts) < P:
                raise ValueError(f"{len(self.prompts)} prompts cannot fill one rollout of {P} prompts; lower batch_size "
                                 "or grad_accum")
            g = torch.Generator().manual_seed(self._seed("order", epoch))
            order = torch.randperm(len(self.prompts), generator=g).tolist()
            self._orders = {(epoch, world): [order[i:i + P] for i in range(0, len(order) - P + 1, P)]}
        return self._orders[(epoch, world)]

    def _reserve(self, epoch: int, r: int, chunk: list[int]) -> Iterator[Prompt]:
        """The prompts outside rollout r's chunk, in an order seeded by (seed, epoch, r); lazy: nothing is
        shuffled unless a rollout draws from it."""
        taken, shuffle = set(chunk), torch.Generator().manual_seed(self._seed("reserve", epoch, r))
        yield from (self.prompts[i] for i in torch.randperm(len(self.prompts), generator=shuffle).tolist()
                    if i not in taken)

    def epoch_plan(self, epoch: int, world: int) -> list[list[int]]:
        return [rows for r, chunk in enumerate(self._rollouts(epoch, world))
                for rows in self.step_rows(epoch, r, len(chunk) * getattr(self.config, "num_generations", 1))]

    def before_step(self, job) -> dict:
        """Sample the rollout this step trains on, unless it is the one held (a step that reuses it, or
        a resume that restored it); returns its metrics for the record of the step that sampled it."""
        epoch, index = divmod(job.step, job.per_epoch)
        r = index // self.updates
        if self.rollout_key == (epoch, r):
            return {}
        chunk = self._rollouts(epoch, job.world)[r]
        g = torch.Generator(device=job.model.model.embed_tokens.weight.device)
        g.manual_seed(self._seed("sample", epoch, r))
        self.rollout, self.rollout_texts, metrics = self.make_rollout(job.model, [self.prompts[i] for i in chunk], g,
                                                                      self._reserve(epoch, r, chunk))
        self.rollout_key = (epoch, r)
        every = self.config.log_completions
        if job.rank == 0 and every and (job.step // self.updates) % every == 0:
            for text, value in list(zip(self.rollout_texts, self.rollout["rewards"].tolist()))[:3]:
                job.say(f"  [step {job.step + 1}] reward {value:+.3f}: {text[:200]!r}")
        return metrics

    # -- micro-batches --------------------------------------------------------------------------------
    def batch(self, rows: list[int], filler: bool = False) -> dict:
        """The rows' table entries, cut to their longest row; a filler has no trained token and weighs 0."""
        idx = torch.tensor(rows, dtype=torch.long)
        labels = self.rollout["labels"][idx]
        length = int((labels != IGNORE).float().cumsum(1).argmax(1).max()) + 1  # past the last completion token
        out = {k: v[idx][:, :length if v.shape[1] == labels.shape[1] else length - 1]
               for k, v in self.rollout.items() if v.dim() == 2}
        out.update({k: v[idx] for k, v in self.rollout.items() if v.dim() == 1})
        if filler:
            out["labels"] = torch.full_like(out["labels"], IGNORE)
        out["weight"] = torch.tensor(0 if filler else self.weight_of(out))
        return out

    @staticmethod
    def weight(batch: dict) -> int:
        return int(batch["weight"])

    # -- state, data, evaluation ----------------------------------------------------------------------
    def state(self) -> dict:
        if self.rollout is None:
            return {}
        return {**self.rollout, "\x1fkey": torch.tensor(self.rollout_key)}

    def load_state(self, tensors: dict):
        if "\x1fkey" in tensors:
            self.rollout_key = tuple(tensors.pop("\x1fkey").tolist())
            self.rollout, self.rollout_texts = tensors, []

    def data_digest(self) -> str:
        return prompts_digest(self.prompts)

    def evaluate(self, model) -> dict:
        return evaluate_prompts(model, self.tokenizer, self.eval_items, self.reward, self.config, self.stop_ids,
                                self.pad_id, max(self.config.batch_size, 16))
