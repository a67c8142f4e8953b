"""Reward sources for the RL rung: task scorers as verifiable rewards, a user's function, weighted sums,
and every unusable reward refused by name."""

import math
import sys

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
