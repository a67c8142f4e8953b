"""Reward sources for the RL rung: task scorers as verifiable rewards, a user's function, weighted sums,
and every unusable reward refused by name."""

import math
import sys
from pathlib import Path

import pytest

from minicustom.rewards import CombinedReward, RewardError, build_reward, scorer_reward

RECORDS = [{"answer": "12"}, {"answer": "7"}, {"answer": "positive"}]


def test_scorers_are_zero_one_rewards():
    number = scorer_reward("number")
    assert number(["q"] * 2, ["The answer is 12.", "8"], RECORDS[:2]) == [1.0, 0.0]
    label = scorer_reward("label", ["positive", "negative"])
    assert label(["q"], ["Negative, then positive"], [RECORDS[2]]) == [0.0]  # the first label named wins
    exact = scorer_reward("exact")
    assert exact(["q"], ["Positive."], [RECORDS[2]]) == [1.0]


def test_a_weighted_sum_keeps_its_parts(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def brevity(prompts, completions, records):\n"
                                            "    return [-len(c) / 10 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward("number,my_rewards:brevity", weights=[1.0, 0.5])
    completions = ["The answer is 12.", "7"]
    parts = reward.parts(["a", "b"], completions, RECORDS[:2])
    assert parts == {"number": [1.0, 1.0], "my_rewards:brevity": [-1.7, -0.1]}
    assert reward(["a", "b"], completions, RECORDS[:2]) == pytest.approx([1.0 - 0.85, 1.0 - 0.05])
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("returned, says", [
    ([1.0], "returned 1 values; expected 2, one per completion"),
    ("1,2", "returned str; expected 2"),
    ([1.0, math.nan], "returned nan for completion 1; expected a finite number"),
    ([1.0, math.inf], "returned inf for completion 1"),
    ([1.0, None], "returned None for completion 1"),
    ([True, 1.0], "returned True for completion 0"),
])
def test_an_unusable_reward_is_named(returned, says):
    reward = CombinedReward([("mine", lambda p, c, r: returned)])
    with pytest.raises(RewardError, match=f"^reward mine {says}"):
        reward(["a", "b"], ["x", "y"], [{}, {}])


@pytest.mark.parametrize("spec, says", [
    ("nosuch:fn", "--reward nosuch:fn: cannot import nosuch"),
    ("math:nosuch", "--reward math:nosuch: math has no function 'nosuch'"),
    ("number,", "an empty entry"),
    ("numbr", r"--reward numbr: expected a scorer \(exact, label, number\), module:function, or a reward model folder"),
])
def test_a_bad_reward_spec_is_named(spec, says):
    with pytest.raises(RewardError, match=says):
        build_reward(spec)


def test_bad_weights_and_records():
    with pytest.raises(RewardError, match="2 reward weights for 1 reward sources"):
        build_reward("number", weights=[1.0, 2.0])
    with pytest.raises(RewardError, match="finite"):
        build_reward("number", weights=[math.nan])
    with pytest.raises(RewardError, match="the 'label' reward needs the task's labels"):
        build_reward("label")
    with pytest.raises(RewardError, match="record 0 has none"):
        build_reward("number")(["q"], ["1"], [{"question": "q"}])


def test_the_arithmetic_step_reward_credits_true_steps_on_the_reference_path(monkeypatch):
    """examples/arithmetic_reward.py (the RLHF demo's process reward): 1/n for each of the rationale's n
    results reached by a true calculation; a false one, an identity ("16 + 0 = 16") or a true sum off the
    path earn nothing. Through build_reward, as `--reward examples.arithmetic_reward:steps` loads it."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))
    reward = build_reward("number,examples.arithmetic_reward:steps", weights=[1.0, 0.5])
    record = {"answer": "43", "rationale": "Mia starts with 10. 10 + 6 = 16. 16 * 2 = 32. 32 + 11 = 43."}
    completions = ["10 + 6 = 16. 16 * 2 = 32. 32 + 11 = 43. The answer is 43.",  # all three steps, right answer
                   "10 + 6 = 16. 16 * 2 = 33. 33 + 11 = 44. The answer is 44.",  # one true step
                   "10 + 6 = 15. 15 * 2 = 32. 32 + 11 = 43. The answer is 43.",  # 15 false; 32 false; 43 true
                   "16 + 0 = 16. 1 * 32 = 32. 2 + 2 = 4. The answer is 4.",     # identities and a sum off the path
                   "The answer is 43."]                                         # right, with no steps
    parts = reward.parts(["q"] * 5, completions, [record] * 5)
    assert parts["examples.arithmetic_reward:steps"] == [1.0, 1 / 3, 1 / 3, 0.0, 0.0]
    assert reward(["q"] * 5, completions, [record] * 5) == pytest.approx([1.5, 1 / 6, 1 + 1 / 6, 0.0, 1.0])
    with pytest.raises(ValueError, match="needs each record's 'rationale'; record 0 has none"):
        reward.parts(["q"], ["1 + 1 = 2"], [{"answer": "2"}])
    for name in ("examples.arithmetic_reward", "examples"):  # imported from the repository root, taken off after
        sys.modules.pop(name, None)
