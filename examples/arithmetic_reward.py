"""A verifiable process reward for the arithmetic task: credit for each step of the record's worked rationale
that the completion reaches by a correct calculation.

    minicustom train grpo ... --reward number,examples.arithmetic_reward:steps --reward-weights 1,0.5

The `number` scorer gives 1 or 0 for the final answer, so a group of samples that are all wrong teaches
nothing. `steps` tells the wrong ones apart: the reference rationale "10 + 6 = 16. 16 * 2 = 32. 32 + 11 =
43." has the intermediate results {16, 32, 43}; a completion earns 1/3 for each of them it writes as the
result of a true "a op b = c" (op one of + - *). A false calculation earns nothing, even with the right c,
and a true one off the reference's path earns nothing either, so the reward cannot be raised by writing
easy sums. It needs each record's `rationale` (the arithmetic task's records hold one).
"""

import re

STEP = re.compile(r"(\d+) *([-+*]) *(\d+) *= *(\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def calculations(text: str) -> list[tuple[bool, int]]:
    """Each "a op b = c" of text as (whether it is true and moves: c differs from a and b, so that "16 + 0 =
    16" reaches nothing, c)."""
    found = []
    for a, op, b, c in STEP.findall(text):
        a, b, c = int(a), int(b), int(c)
        found.append((OPS[op](a, b) == c and c not in (a, b), c))
    return found


def step_credit(completion: str, rationale: str) -> float:
    """The share of the rationale's intermediate results that the completion reaches by a true calculation."""
    wanted = {c for _, c in calculations(rationale)}
    if not wanted:
        raise ValueError(f"the rationale {rationale!r} holds no 'a op b = c' step")
    reached = {c for true, c in calculations(completion) if true}
    return len(wanted & reached) / len(wanted)


def steps(prompts, completions, records):
    """The reward function (minicustom's signature): step_credit of each completion against its record."""
    if missing := [i for i, r in enumerate(records) if not isinstance(r.get("rationale"), str)]:
        raise ValueError(f"the steps reward needs each record's 'rationale'; record {missing[0]} has none")
    return [step_credit(c, r["rationale"]) for c, r in zip(completions, records)]
