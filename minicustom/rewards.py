"""Where an RL run's reward comes from: verifiable rewards from the shipped tasks' scorers, a user's Python
function, or a weighted sum of several (a reward model folder joins them as one more source).

A reward function takes the batch's prompts, its completions and the records they came from (each a
dict of the task's JSONL, with the reference `answer` and anything else the record holds) and returns one
float per completion:

    reward(prompts: list[str], completions: list[str], records: list[dict]) -> list[float]

"Verifiable rewards" (as in DeepSeek-R1 and Tülu 3's RLVR) score a completion by checking its answer:
1.0 when the task's scorer accepts it, 0.0 otherwise. `--reward module:function` imports a user's
function; `--reward number,module:function --reward-weights 1,0.5` sums several. Every reward is checked
when it is computed: one float per completion, finite, named in the error otherwise. Left out: TRL's
per-function "None means not applicable" rewards, async reward servers.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .evaluate import SCORERS
from .prompting import turn_tail
from .reward_model import check_same_tokenizer, load_reward_model
from .tokenizer import load_tokenizer

RewardFn = Callable[[list[str], list[str], list[dict]], Sequence[float]]


class RewardError(ValueError):
    """A reward source that cannot be used, or a reward function that returned something unusable."""


def scorer_reward(scorer: str, labels: Sequence[str] | None = None) -> RewardFn:
    """A task scorer ("exact", "label", "number") as a 0/1 reward against each record's `answer`."""
    if scorer not in SCORERS:
        raise RewardError(f"unknown scorer {scorer!r}; scorers: {', '.join(SCORERS)}")
    if scorer == "label" and not labels:
        raise RewardError("the 'label' reward needs the task's labels")
    score = SCORERS[scorer]

    def reward(prompts, completions, records):
        if missing := [i for i, r in enumerate(records) if not isinstance(r.get("answer"), str)]:
            raise RewardError(f"the {scorer!r} reward needs each record's 'answer' (a string); record {missing[0]} "
                              "has none")
        args = [(c, r["answer"]) + ((labels,) if scorer == "label" else ()) for c, r in zip(completions, records)]
        return [float(score(*a)) for a in args]

    reward.__name__ = f"{scorer}_reward"
    return reward


def import_reward(spec: str) -> RewardFn:
    """`module:function` -> that function, imported (the module must be importable: installed, or on
    PYTHONPATH)."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise RewardError(f"--reward {spec}: expected a scorer ({', '.join(SCORERS)}), module:function, or a "
                          "reward model folder (no such folder)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"--reward {spec}: cannot import {module_name}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"--reward {spec}: {module_name} has no function {name!r}")
    return fn


def checked(values, fn_name: str, n: int) -> list[float]:
    """The rewards `fn_name` returned, refused unless they are n finite numbers."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        found = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"reward {fn_name} returned {found}; expected {n}, one per completion")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RewardError(f"reward {fn_name} returned {v!r} for completion {i}; expected a finite number")
        out.append(float(v))
    return out


class CombinedReward:
    """Σ_k w_k reward_k, each reward checked. `parts(...)` also returns each source's values (logged as
    reward/<name>), so that a weighted sum does not hide which source moved."""

    def __init__(self, sources: Sequence[tuple[str, RewardFn]], weights: Sequence[float] | None = None):
        if not sources:
            raise RewardError("no reward source given")
        weights = [1.0] * len(sources) if weights is None else list(weights)
        if len(weights) != len(sources):
            raise RewardError(f"{len(weights)} reward weights for {len(sources)} reward sources")
        if any(not (isinstance(w, (int, float)) and math.isfinite(w)) for w in weights):
            raise RewardError(f"reward weights must be finite numbers, got {weights}")
        names = [name for name, _ in sources]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise RewardError(f"reward source {twice[0]} is given twice: each source is summed once, by its name")
        self.sources, self.weights = list(sources), weights

    def parts(self, prompts, completions, records, token_rows=None) -> dict[str, list[float]]:
        """Each source's rewards; a source with a `score_tokens` method (a reward model sharing the policy's
        tokenizer) scores token_rows, the prompt + completion ids, instead of the texts."""
        n = len(completions)
        if len(prompts) != n or len(records) != n:
            raise RewardError(f"{len(prompts)} prompts, {n} completions and {len(records)} records: one each")
        out = {}
        for name, fn in self.sources:
            if hasattr(fn, "score_tokens"):
                if token_rows is None:
                    raise RewardError(f"reward {name} scores token ids; none were given")
                out[name] = checked(fn.score_tokens(token_rows), name, n)
            else:
                out[name] = checked(fn(prompts, completions, records), name, n)
        return out

    def __call__(self, prompts, completions, records) -> list[float]:
        parts = self.parts(prompts, completions, records)
        return [sum(w * parts[name][i] for (name, _), w in zip(self.sources, self.weights))
                for i in range(len(completions))]


class ModelReward:
    """A reward model folder (train/rm.py's, or transformers' *ForSequenceClassification) as a reward source:
    it scores the prompt + completion token ids as they are, so its tokenizer must be the policy's. A
    completion that ends in the end-of-turn token gets the tokens the chat template writes after it (the
    newline of ChatML), since those ended every completion the reward model was trained on: transformers'
    last-non-pad-token rule reads the score there."""

    def __init__(self, folder, tokenizer, device="cpu", batch_size: int = 8):
        self.model = load_reward_model(folder, device=device).eval()
        if tokenizer is not None:
            check_same_tokenizer(load_tokenizer(folder), tokenizer, f"reward model {folder}")
        self.tail = turn_tail(tokenizer) if tokenizer is not None else []
        self.eos, self.batch_size = getattr(tokenizer, "eos_token_id", None), batch_size
        self.pad = self.model.config.pad_token_id

    @torch.no_grad()
    def score_tokens(self, rows: list[list[int]]) -> list[float]:
        rows = [r + self.tail if self.tail and r and r[-1] == self.eos else r for r in rows]
        device = self.model.model.embed_tokens.weight.device
        out = []
        for i in range(0, len(rows), self.batch_size):
            part = rows[i:i + self.batch_size]
            T = max(len(r) for r in part)
            ids = torch.full((len(part), T), self.pad, dtype=torch.long)
            mask = torch.zeros((len(part), T), dtype=torch.long)
            for b, r in enumerate(part):
                ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
            out += self.model(ids.to(device), attention_mask=mask.to(device)).float().cpu().tolist()
        return out


def check_answers(reward: CombinedReward, records: Sequence[tuple[str, dict]]):
    """Before any sampling: every record a scorer reward reads holds its `answer` as a string (where: the
    record's file:line)."""
    if scorers := [name for name, _ in reward.sources if name in SCORERS]:
        for where, record in records:
            if not isinstance(answer := record.get("answer"), str):
                found = "no field 'answer'" if answer is None else f"'answer' {answer!r}, a {type(answer).__name__}"
                raise RewardError(f"{where}: the {scorers[0]!r} reward compares with the record's 'answer', a string; "
                                  f"the record has {found}")


def build_reward(specs: str, weights: Sequence[float] | None = None, labels=None, tokenizer=None,
                 device="cpu") -> CombinedReward:
    """From the command line: scorer names, module:function specs and reward model folders, separated by
    commas (a reward model must share `tokenizer`, the policy's)."""
    sources = []
    for spec in (s.strip() for s in specs.split(",")):
        if not spec:
            raise RewardError(f"--reward {specs!r}: an empty entry")
        if spec in SCORERS:
            sources.append((spec, scorer_reward(spec, labels)))
        elif Path(spec).is_dir():
            sources.append((Path(spec).name, ModelReward(spec, tokenizer, device)))
        else:
            sources.append((spec, import_reward(spec)))
    return CombinedReward(sources, weights)
