"""The online RL trainers (GRPO, RLOO, PPO) on the shared loop, on a tiny random model: rollouts (what is
sampled and trained), the loss modules against the loss functions, gradient accumulation equal to one
batch, resume bit for bit, and the errors a user can provoke."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint, write_tokenizer
from test_cli_errors import fails

import minicustom as mc
from minicustom.cli import main
from minicustom.data import IGNORE, DataError
from minicustom.losses import gae, policy_loss, token_logps
from minicustom.methods import apply_method
from minicustom.rewards import CombinedReward, RewardError
from minicustom.train.dpo import make_reference
from minicustom.train.loop import accumulate_gradients
from minicustom.train.ppo import PPOConfig, PPOTask, train_ppo, whiten
from minicustom.train.rl import PolicyLoss, RLConfig, RLTask, train_rl
from minicustom.train.rollout import load_prompts, prompt_runs, rows_hidden, rows_table


@pytest.fixture(scope="module")
def rl(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    path, _ = make_checkpoint(root / "model", "smollm", vocab_size=400)
    write_tokenizer(path)
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Name city {i}."},
                          {"role": "assistant", "content": "Paris"}], "answer": "Paris"} for i in range(10)]
    rows += [{"prompt": f"Where is city {i}?", "answer": "Oslo"} for i in range(6)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, path, mc.load_tokenizer(path)


def length_reward(prompts, completions, records):
    return [float(len(c) % 3) for c in completions]


def spread_reward(prompts, completions, records):
    """Distinct rewards for distinct completions: every advantage nonzero."""
    return [float(sum(map(ord, c)) % 101) / 10 for c in completions]


def policy(path, r=4):
    model = mc.load_model(path)
    torch.manual_seed(0)
    apply_method(model, "lora", r=r, dropout=0.0)
    return model


def rl_config(**kw):
    return RLConfig(**{"beta": 0.0, "batch_size": 4, "num_generations": 2, "max_new_tokens": 6, "max_length": 64, "max_steps": 3,
                       "lr": 1e-3, "log_completions": 0, "schedule": "constant", **kw})


def ppo_config(**kw):
    return PPOConfig(**{"batch_size": 2, "num_mini_batches": 2, "num_ppo_epochs": 2, "max_new_tokens": 6,
                        "max_length": 64, "max_steps": 6, "lr": 1e-3, "log_completions": 0, "schedule": "constant",
                        **kw})


def rollout_task(rl, config, reward=length_reward, reference=None):
    root, path, tok = rl
    model = policy(path)
    prompts = load_prompts(root / "prompts.jsonl", tok, 48)
    cls = PPOTask if isinstance(config, PPOConfig) else RLTask
    args = (model,) if cls is PPOTask else ()
    task = cls(*args, prompts, config, CombinedReward([("len", reward)]), tok, [tok.eos_token_id], 0,
               make_reference(model, "base") if reference else None)
    return model, task


# -- prompts and rollouts -----------------------------------------------------------------------------------

def test_prompts_leave_out_the_answer(rl):
    root, _, tok = rl
    prompts = load_prompts(root / "prompts.jsonl", tok, 48)
    assert len(prompts) == 16
    text = tok.decode(prompts[0].ids)
    assert "Name city 0." in text and "Paris" not in text and text.endswith("<|im_start|>assistant\n")
    assert tok.decode(prompts[10].ids).endswith("Where is city 0?")  # a string prompt is encoded as it is


@pytest.mark.parametrize("record,field", [({"prompt": ""}, "prompt"), ({"text": "hi"}, "'prompt'"),
                                          ({"messages": [{"role": "assistant", "content": "x"}]}, "messages")])
def test_bad_prompt_records_name_file_line_and_field(rl, tmp_path, record, field):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{field}"):
        load_prompts(bad, rl[2], 48)


def test_rollout_rows_train_exactly_the_sampled_completion(rl):
    """Each row is prompt + completion; only the completion is labelled, up to and including its stop token;
    G consecutive rows share a prompt; the same seed samples the same completions."""
    config = rl_config(max_new_tokens=12)
    model, task = rollout_task(rl, config)
    prompts = task.prompts[:2]
    table, texts, metrics = task.make_rollout(model, prompts, torch.Generator().manual_seed(0))
    again, _, _ = task.make_rollout(model, prompts, torch.Generator().manual_seed(0))
    assert torch.equal(table["input_ids"], again["input_ids"])
    eos = task.stop_ids[0]
    for i, row in enumerate(table["input_ids"]):
        p = prompts[i // 2].ids
        assert row[:len(p)].tolist() == p
        trained = table["labels"][i] != IGNORE
        assert not trained[:len(p)].any()
        completion = table["labels"][i][trained].tolist()
        assert row[len(p):len(p) + len(completion)].tolist() == completion
        assert len(completion) == 12 or completion[-1] == eos
        assert eos not in completion[:-1]
    assert table["advantages"].shape == (4,) and len(texts) == 4
    assert metrics["completion_length"] == float((table["labels"] != IGNORE).sum()) / 4


def test_policy_loss_module_equals_policy_loss(rl):
    """The loss module's sum over a micro-batch, divided by its weight, is losses.policy_loss on the rows'
    per-token log-probs, taken as the module takes them (rows_hidden: its equality with forward_hidden, up
    to rounding, is test_rows_that_share_a_prompt_run_it_once's). The loss sits near 0 here (advantages of
    both signs): on an AVX-512 Xeon the plain forward_hidden moved it by 2.3e-7, nearly its own size."""
    config = rl_config(num_iterations=2, beta=0.1, loss_type="dapo", max_new_tokens=10, temperature=0.7)
    model, task = rollout_task(rl, config, reference=True)
    task.rollout, *_ = task.make_rollout(model, task.prompts[:2], torch.Generator().manual_seed(1))
    batch = task.batch([0, 1, 2, 3])
    module = PolicyLoss(model, config)
    summed, stats = module(**batch)
    h = rows_hidden(model, batch["input_ids"], batch["labels"])
    logps = token_logps(h, batch["labels"], model.head(), config.loss_chunk, temperature=0.7)
    mask = batch["labels"][:, 1:] != IGNORE
    expected = policy_loss(logps, batch["old_logps"], batch["advantages"], mask, "dapo", 0.2, None, 0.1,
                           batch["ref_logps"])
    assert int(batch["weight"]) == int(mask.sum())
    eps = torch.finfo(torch.float32).eps  # loss * weight / weight: two roundings of the same loss
    torch.testing.assert_close(summed / batch["weight"], expected, rtol=2 * eps, atol=0)


@pytest.mark.parametrize("family", ["smollm", "mistral", "gemma2", "qwen3"])
def test_rows_that_share_a_prompt_run_it_once(tmp_path, family):
    """rows_hidden runs each shared prompt once (PromptKV) and equals forward_hidden on every row, forward and
    LoRA gradients: runs of 3, 1 and 2 rows, prompts of 5, 9 and 9 tokens (the last two differ in one
    token), completions of 1 to 6 tokens, right-padded. Sliding windows (mistral, gemma2: 7) reach into
    the prompt; gemma2 soft-caps scores. fp32: the same sums, grouped by other matmul shapes (a few ulp
    of the largest entry; a wrong position or a missing key moves entries by O(1))."""
    path, _ = make_checkpoint(tmp_path / family, family, vocab_size=300)
    model = policy(path)
    g = torch.Generator().manual_seed(0)
    p1, p2 = torch.randint(1, 300, (5,), generator=g).tolist(), torch.randint(1, 300, (9,), generator=g).tolist()
    p3 = p2[:4] + [(p2[4] + 1) % 300] + p2[5:]
    prompts = [p1] * 3 + [p2] + [p3] * 2
    completions = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (6, 1, 3, 4, 2, 5)]
    table = rows_table(prompts, completions, pad_id=0)
    ids, labels = table["input_ids"], table["labels"]
    assert prompt_runs(ids, labels) == [(0, 3, 5), (3, 4, 9), (4, 6, 9)]
    embedded = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: embedded.append(o.shape[0] * o.shape[1]))
    results = []
    for forward in (rows_hidden, lambda m, x, _: m.forward_hidden(x)):
        model.zero_grad()
        h = forward(model, ids, labels)
        (h.square() * (labels != IGNORE)[..., None]).sum().backward()  # the trained positions
        results.append((h.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    hook.remove()
    T = ids.shape[1]
    assert embedded == [5, 3 * (T - 5), 9, T - 9, 9, 2 * (T - 9), 6 * T]  # each prompt once, then as rows
    (h, grads), (h_ref, grads_ref) = results
    scale = float(h_ref.abs().max())
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-5 * scale)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-5 * float(g_ref.abs().max()))


def test_rows_run_as_they_are_where_nothing_is_shared(rl):
    """One row per prompt, a filler (no trained token) or gradient checkpointing: the plain forward."""
    model, _ = rollout_task(rl, rl_config())
    table = rows_table([[5, 6, 7], [5, 6, 8]], [[9], [9, 10]], pad_id=0)
    assert prompt_runs(table["input_ids"], table["labels"]) is None
    assert prompt_runs(table["input_ids"][[0, 0]], torch.full_like(table["labels"][:2], IGNORE)) is None
    shared = rows_table([[5, 6, 7]] * 2, [[9], [9, 10]], pad_id=0)
    model.train()
    model.gradient_checkpointing = True
    h = rows_hidden(model, shared["input_ids"], shared["labels"])
    assert torch.equal(h, model.forward_hidden(shared["input_ids"]))


@pytest.mark.parametrize("algorithm,loss_type", [("grpo", "grpo"), ("grpo", "dapo"), ("grpo", "dr_grpo"),
                                                 ("rloo", "grpo"), ("grpo", "bnpo")])
def test_micro_batches_give_the_gradient_of_one_batch(rl, algorithm, loss_type):
    """Two micro-batches of 2 rows and one of 4: the same gradient, TRL's normalizers over a step (the loop
    divides by the step's weight). bnpo is TRL's micro-batch token mean, averaged over the micro-batches:
    its two-micro-batch gradient is the mean of each micro-batch's alone."""
    config = rl_config(algorithm=algorithm, loss_type=loss_type, num_iterations=2, max_new_tokens=10)
    model, task = rollout_task(rl, config, reward=spread_reward)
    task.rollout, *_ = task.make_rollout(model, task.prompts[:2], torch.Generator().manual_seed(2))
    module = task.loss_module(model)
    grads = []
    for micros in ([task.batch([0, 1, 2, 3])], [task.batch([0, 1]), task.batch([2, 3])], [task.batch([0, 1])],
                   [task.batch([2, 3])]):
        model.zero_grad()
        accumulate_gradients(module, micros, "cpu", weight=task.weight)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    if loss_type == "bnpo":
        assert task.weight(task.batch([0, 1])) == 1
        grads[0] = (grads[2] + grads[3]) / 2
    assert grads[0].abs().sum() > 0
    # fp32: the two layouts pad rows to other widths, so sums run in another order (a few ulp of the largest
    # entry); a wrong normalizer would be off by a factor near 2
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * float(grads[0].abs().max()))


def test_ppo_rollout_folds_the_kl_into_the_rewards(rl):
    """r_t = −β (log π_old − log π_ref) + the score on the last token; advantages are GAE of those, whitened;
    returns = GAE + the old values (zero at the start: the value head starts at 0)."""
    config = ppo_config(beta=0.3, max_new_tokens=10)
    model, task = rollout_task(rl, config, reference=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # the policy moves away from the reference
    table, texts, metrics = task.make_rollout(model, task.prompts[:4], torch.Generator().manual_seed(3))
    mask = table["labels"][:, 1:] != IGNORE
    from minicustom.train.rollout import table_logps

    with torch.no_grad(), task.reference.scope(model) as ref_model:
        ref = table_logps(ref_model, table, config)
    kl = (table["old_logps"] - ref) * mask
    assert kl.abs().sum() > 0
    rewards = -0.3 * kl
    for i in range(4):
        last = int(mask[i].nonzero().max())
        rewards[i, last] += table["rewards"][i]
    advantages, returns = gae(rewards, torch.zeros_like(rewards), mask, 1.0, 0.95)
    torch.testing.assert_close(table["advantages"], whiten(advantages, mask))
    torch.testing.assert_close(table["returns"], returns)
    assert metrics["kl"] == pytest.approx(float(kl.sum(1).mean()), rel=1e-5)


# -- runs, resume, errors ------------------------------------------------------------------------------------

def run_metrics(rl, out, train_fn, config, stop_after=None, resume=False, reference=False):
    root, path, tok = rl
    model = policy(path)
    prompts = load_prompts(root / "prompts.jsonl", tok, 48)

    def on_step(step, record):
        if stop_after and step == stop_after:
            raise KeyboardInterrupt

    try:
        train_fn(model, prompts, config, out, reward=CombinedReward([("len", length_reward)]), tokenizer=tok,
                 stop_ids=[tok.eos_token_id], pad_id=0, reference=make_reference(model, "base") if reference else None,
                 eval_prompts=prompts[:3], resume=resume, on_step=on_step)
    except KeyboardInterrupt:
        pass
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["grpo", "grpo-dynamic", "ppo"])
def test_resume_reproduces_the_run_bit_for_bit(rl, tmp_path, kind):
    """A run stopped after step 3 (mid-rollout: GRPO reuses each rollout twice, PPO four times) and resumed
    logs what the uninterrupted run logged, every float equal (with dynamic sampling's extra draws too)."""
    dynamic = 2 if kind == "grpo-dynamic" else 0
    train_fn, config = ((train_rl, rl_config(num_iterations=2, max_steps=6, save_every=1, beta=0.05,
                                             dynamic_sampling=dynamic))
                        if kind != "ppo" else (train_ppo, ppo_config(max_steps=6, save_every=1)))
    whole = run_metrics(rl, tmp_path / "a", train_fn, config, reference=True)
    run_metrics(rl, tmp_path / "b", train_fn, config, stop_after=3, reference=True)
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-000003" / "task.safetensors").exists()
    resumed = run_metrics(rl, tmp_path / "b", train_fn, config, resume=True, reference=True)
    assert len(whole) == 7 and resumed == whole
    assert any("reward" in r for r in whole[2:]) and whole[-1]["loss"] != whole[1]["loss"]


def oslo_only_reward(prompts, completions, records):
    """Unequal rewards for the "Oslo" prompts' completions, 0 for every other prompt's (a group of equal
    rewards)."""
    return [spread_reward(None, [c], None)[0] if r["answer"] == "Oslo" else 0.0 for c, r in zip(completions, records)]


@pytest.mark.parametrize("rounds,reserve_from,replaced", [(0, 10, 0), (3, 10, 2), (3, 2, 0)])
def test_dynamic_sampling_replaces_the_groups_with_equal_rewards(rl, rounds, reserve_from, replaced):
    """DAPO's dynamic sampling: the two "Paris" prompts' groups (all rewards 0) give their places to groups
    of fresh "Oslo" prompts (unequal rewards), drawn from the reserve in order, as many per round as the
    rollout holds; with no such prompt in the reserve every round is drawn and the equal groups stay. The
    reward metrics are the first draw's."""
    model, task = rollout_task(rl, rl_config(dynamic_sampling=rounds), reward=oslo_only_reward)
    reserve = task.prompts[reserve_from:reserve_from + 6]
    table, texts, metrics = task.make_rollout(model, task.prompts[:2], torch.Generator().manual_seed(5), reserve)
    assert metrics["frac_reward_zero_std"] == 1.0 and metrics["reward"] == 0.0
    assert metrics.get("groups_replaced", 0) == replaced
    assert metrics.get("groups_drawn", 2) == (4 if replaced else 2 + 2 * rounds)
    prompt_of = [task.tokenizer.decode(table["input_ids"][i].tolist()) for i in range(4)]
    rewards = table["rewards"].view(2, 2)
    if replaced:  # the first two reserve prompts, in order, each with its two completions
        assert all("Where is city 0?" in t for t in prompt_of[:2]) and all("city 1?" in t for t in prompt_of[2:])
        assert (rewards[:, 0] != rewards[:, 1]).all() and (table["advantages"] != 0).all()
    else:
        assert all("Name city" in t for t in prompt_of) and (table["advantages"] == 0).all()


def test_reward_that_returns_nan_or_the_wrong_count_is_named(rl, tmp_path):
    for bad, message in ((lambda p, c, r: [float("nan")] * len(c), r"reward len returned nan for completion 0"),
                         (lambda p, c, r: [1.0], r"reward len returned 1 values; expected 4")):
        model, task = rollout_task(rl, rl_config(), reward=bad)
        with pytest.raises(RewardError, match=message):
            task.make_rollout(model, task.prompts[:2], torch.Generator().manual_seed(0))


def test_cli_refuses_a_group_size_that_does_not_divide_the_batch(rl, tmp_path, capsys):
    root, path, _ = rl
    out = tmp_path / "out"
    err = fails(["train", "grpo", "--model", path, "--data", root / "prompts.jsonl", "--reward", "exact",
                 "--out", out, "--batch-size", "6", "--num-generations", "4"], capsys)
    assert "num_generations 4 does not divide the 6 completions of a step" in err and not out.exists()


@pytest.mark.parametrize("kind", ["grpo", "rloo", "ppo"])
def test_cli_trains_and_exports_an_adapter(rl, tmp_path, kind):
    root, path, _ = rl
    out = tmp_path / kind
    main(["train", kind, "--model", str(path), "--data", str(root / "prompts.jsonl"), "--reward", "exact",
                 "--eval-data", str(root / "prompts.jsonl"), "--out", str(out), "--max-steps", "2",
                 "--max-new-tokens", "6", "--max-length", "64", "--batch-size", "4", "--r", "4"])
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval_reward" in rows[0] and "eval_reward" in rows[-1] and "reward" in rows[1]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["reward"] == "exact" and saved["algorithm"] == kind


# -- a reward model as the reward ---------------------------------------------------------------------------

def reward_model_folder(rl, folder):
    from minicustom.checkpoint import copy_tokenizer_files
    from minicustom.reward_model import RewardModel, save_reward_model

    _, path, _ = rl
    torch.manual_seed(5)
    rm = RewardModel.from_causal_lm(mc.load_model(path), pad_token_id=0)
    save_reward_model(rm, folder)
    copy_tokenizer_files(path, folder)
    return rm


def test_model_reward_scores_the_rows_as_the_reward_model_does(rl, tmp_path):
    """ModelReward scores prompt + completion ids with the reward model (batched, right-padded), and adds the
    chat template's end-of-turn tail after a completion that ends in EOS, as a rendered pair ends."""
    from minicustom.prompting import turn_tail
    from minicustom.rewards import ModelReward

    root, path, tok = rl
    rm = reward_model_folder(rl, tmp_path / "rm").eval()
    source = ModelReward(tmp_path / "rm", tok, batch_size=2)
    tail = turn_tail(tok)
    assert tail == tok.encode("\n", add_special_tokens=False)
    rows = [[5, 6, 7], [8, 9, tok.eos_token_id], [10, 11, 12, 13, 14]]
    got = source.score_tokens(rows)
    with torch.no_grad():
        expected = [float(rm(torch.tensor([r + (tail if r[-1] == tok.eos_token_id else [])]))[0]) for r in rows]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_ppo_takes_a_reward_model_folder(rl, tmp_path):
    root, path, _ = rl
    reward_model_folder(rl, tmp_path / "rm")
    out = tmp_path / "ppo"
    main(["train", "ppo", "--model", str(path), "--data", str(root / "prompts.jsonl"), "--reward", str(tmp_path / "rm"),
          "--out", str(out), "--max-steps", "2", "--max-new-tokens", "6", "--max-length", "64", "--batch-size", "4",
          "--r", "4"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and "explained_variance" in rows[0] and "kl" in rows[0]
    assert rows[0]["reward/rm"] == pytest.approx(rows[0]["reward"], rel=1e-6)


def test_a_reward_model_with_another_tokenizer_is_refused(rl, tmp_path, capsys):
    root, path, _ = rl
    reward_model_folder(rl, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "tokenizer.json").read_text())
    vocab = config["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids: same size, other text
    (tmp_path / "rm" / "tokenizer.json").write_text(json.dumps(config))
    out = tmp_path / "ppo"
    err = fails(["train", "ppo", "--model", path, "--data", root / "prompts.jsonl", "--reward", tmp_path / "rm",
                 "--out", out], capsys)
    assert f"reward model {tmp_path / 'rm'}: its tokenizer differs from the policy's" in err and not out.exists()


def test_rloo_takes_the_kl_from_the_reward(rl):
    """RLOO with β: advantages are the leave-one-out ones of r − β Σ_t (log π_old − log π_ref), and
    normalize_advantages whitens them (TRL's rloo_trainer.py:1664-1699)."""
    from minicustom.losses import rloo_advantages

    for normalize in (False, True):
        config = rl_config(algorithm="rloo", beta=0.2, normalize_advantages=normalize, max_new_tokens=10)
        model, task = rollout_task(rl, config, reward=spread_reward, reference=True)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        table, _, metrics = task.make_rollout(model, task.prompts[:2], torch.Generator().manual_seed(4))
        mask = table["labels"][:, 1:] != IGNORE
        kl = ((table["old_logps"] - table["ref_logps"]) * mask).sum(-1)
        assert kl.abs().sum() > 0 and metrics["kl"] == pytest.approx(float(kl.mean()), rel=1e-5)
        expected = rloo_advantages(table["rewards"] - 0.2 * kl, 2)
        if normalize:
            expected = (expected - expected.mean()) / (expected.std() + 1e-4)
        torch.testing.assert_close(table["advantages"], expected)


def test_options_of_the_other_algorithm_are_refused():
    for kw, field in (({"algorithm": "rloo", "loss_type": "dapo"}, "loss_type"),
                      ({"algorithm": "rloo", "scale": "none"}, "scale"),
                      ({"normalize_advantages": True}, "normalize_advantages"),
                      ({"num_generations": 1}, "num_generations"), ({"max_new_tokens": 64}, "max_new_tokens"),
                      ({"epsilon_high": -1.0}, "epsilon_high")):
        with pytest.raises(ValueError, match=rf"RLConfig\.{field} must be"):
            rl_config(**kw)
    with pytest.raises(ValueError, match=r"PPOConfig\.epsilon_high must be"):
        ppo_config(epsilon_high=0.0)
    assert RLConfig(algorithm="rloo").beta == 0.05 and RLConfig().beta == 0.0 and PPOConfig().beta == 0.05


def test_a_source_given_twice_is_refused():
    with pytest.raises(RewardError, match="reward source number is given twice"):
        CombinedReward([("number", length_reward), ("number", spread_reward)])


def test_records_without_an_answer_are_refused_before_sampling(rl, tmp_path, capsys):
    root, path, _ = rl
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a", "answer": "x"}) + "\n" +
                                      json.dumps({"prompt": "b", "answer": 42}) + "\n")
    out = tmp_path / "out"
    err = fails(["train", "grpo", "--model", path, "--data", tmp_path / "p.jsonl", "--reward", "number",
                 "--out", out], capsys)
    assert "p.jsonl:2: the 'number' reward compares with the record's 'answer', a string; the record has 'answer' 42" \
        in err and not out.exists()
    err = fails(["train", "grpo", "--model", path, "--data", root / "prompts.jsonl", "--reward", "exact",
                 "--reference", "base", "--out", out], capsys)
    assert "beta is 0, so no reference is used" in err


def a_share(prompts, completions, records):
    """A learnable reward for a random model: the share of the letter a in the completion."""
    return [c.count("a") / max(len(c), 1) for c in completions]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "rloo", "ppo"])
def test_training_raises_a_learnable_reward(rl, tmp_path, kind):
    """The whole loop learns: on the random tiny model, the reward of the sampled completions rises from
    about its chance level to several times it (measured for GRPO: 0.02 in the first five steps, 0.5
    from step 15 on). PPO learns more slowly and less steadily (its value head starts from nothing): it
    gets 60 steps of 16 prompts and Monte-Carlo advantages (lam 1). The end is the mean over the last third
    of the run, since a sampled run is one draw among many and its floating-point sums differ between
    CPUs: over seeds 0-7 on a 2-core AMD EPYC, PPO went from 0.02-0.03 in its first three rollouts to at
    least 0.09 over its last third."""
    root, path, tok = rl
    model = policy(path, r=8)
    prompts = load_prompts(root / "prompts.jsonl", tok, 48)
    common = dict(max_new_tokens=12, max_length=64, lr=2e-2, log_completions=0, schedule="constant", beta=0.0,
                  temperature=0.7)
    if kind == "ppo":
        config = PPOConfig(batch_size=16, num_ppo_epochs=2, vf_coef=0.1, lam=1.0, max_steps=60, **common)
        train_fn = train_ppo
    else:
        config, train_fn = RLConfig(algorithm=kind, batch_size=16, num_generations=4, max_steps=40, **common), train_rl
    history = train_fn(model, prompts, config, tmp_path / kind, reward=CombinedReward([("a", a_share)]),
                       tokenizer=tok, stop_ids=[tok.eos_token_id], pad_id=0)
    rewards = [r["reward"] for r in history if "reward" in r]
    third = len(rewards) // 3
    first, last = sum(rewards[:3]) / 3, sum(rewards[-third:]) / third
    assert first < 0.1 and last > 2 * first + 0.03, rewards
