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

from .evaluate import SCORERS

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
        raise RewardError(f"--reward {spec}: expected module:function (or a scorer: {', '.join(SCORERS)})")
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
        self.sources, self.weights = list(sources), weights

    def parts(self, prompts, completions, records) -> dict[str, list[float]]:
        n = len(completions)
        if len(prompts) != n or len(records) != n:
            raise RewardError(f"{len(prompts)} prompts, {n} completions and {len(records)} records: one each")
        return {name: checked(fn(prompts, completions, records), name, n) for name, fn in self.sources}

    def __call__(self, prompts, completions, records) -> list[float]:
        parts = self.parts(prompts, completions, records)
        return [sum(w * parts[name][i] for (name, _), w in zip(self.sources, self.weights))
                for i in range(len(completions))]


def build_reward(specs: str, weights: Sequence[float] | None = None, labels=None) -> CombinedReward:
    """From the command line: scorer names and module:function specs separated by commas."""
    sources = []
    for spec in (s.strip() for s in specs.split(",")):
        if not spec:
            raise RewardError(f"--reward {specs!r}: an empty entry")
        sources.append((spec, scorer_reward(spec, labels) if spec in SCORERS else import_reward(spec)))
    return CombinedReward(sources, weights)
