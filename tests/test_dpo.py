"""DPO training: preference data, the reference policies, the trainer and the CLI.

The losses themselves are checked number by number in test_preference_losses.py; here the claims are
about what feeds them: the sequence log-probs, which model is the reference, and that the loop (shared
with SFT) accumulates, checkpoints and resumes pairs as it does tokens.
"""

import json
import math

import pytest
import torch
from conftest import CITIES

import minicustom as mc
from minicustom.cli import main
from minicustom.data import DataError, load_preferences, make_pair
from minicustom.losses import IGNORE
from minicustom.methods import apply_method
from minicustom.train import TrainingError
from minicustom.train.dpo import (
    BaseReference,
    DPOConfig,
    DPOLoss,
    SnapshotReference,
    pair_batch,
    precompute_reference,
    reference_key,
    train_dpo,
)
from minicustom.train.loop import accumulate_gradients

LOG2 = torch.tensor(math.log(2), dtype=torch.float32)


def pair_records():
    """Three formats in one file: strings, conversational, and conversations with an implicit prompt."""
    rows = []
    for i, city in enumerate(CITIES):
        other = CITIES[(i + 5) % len(CITIES)]
        if i % 3 == 0:
            rows.append({"prompt": f"Where is {city}?", "chosen": f" In {city}.", "rejected": f" In {other}, I think."})
        elif i % 3 == 1:
            rows.append({"prompt": [{"role": "user", "content": f"Name a city like {city}."}],
                         "chosen": [{"role": "assistant", "content": city}],
                         "rejected": [{"role": "assistant", "content": f"No idea, maybe {other}"}]})
        else:
            user = {"role": "user", "content": f"I live in {city}. Which city?"}
            rows.append({"chosen": [user, {"role": "assistant", "content": city}],
                         "rejected": [user, {"role": "assistant", "content": other}]})
    return rows


@pytest.fixture(scope="module")
def prefs(setup):
    root, path = setup
    rows = pair_records()
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prefs_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    return root, path


def load(prefs, name="prefs.jsonl"):
    root, path = prefs
    return load_preferences(root / name, mc.load_tokenizer(path), max_length=128)


def policy(path, method="lora", randomize=True, **hp):
    """The model with a method attached and (by default) its trainable tensors moved off the identity."""
    model = mc.load_model(path)
    torch.manual_seed(0)
    apply_method(model, method, **hp)
    if randomize and method != "full":
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def row_logps(model, pairs):
    """Textbook sequence log-probs, one unpadded row at a time: sum of log softmax at the trained targets."""
    out = []
    for ex in [p.chosen for p in pairs] + [p.rejected for p in pairs]:
        logits = model(torch.tensor([ex.input_ids]))[0, :-1].float()
        y = torch.tensor(ex.labels[1:])
        keep = y != IGNORE
        out.append(torch.log_softmax(logits, -1)[keep].gather(1, y[keep][:, None]).sum())
    return torch.stack(out)


# -- data ---------------------------------------------------------------------------------------------

def test_formats_mask_all_but_the_completions(prefs):
    _, path = prefs
    tok = mc.load_tokenizer(path)
    pairs = load(prefs)
    assert len(pairs) == len(CITIES)
    for p in pairs:
        for ex in (p.chosen, p.rejected):
            at = [t for t, y in enumerate(ex.labels) if y != IGNORE]
            first, last = at[0], at[-1]  # one run: the completion (a chat's trailing newline is not trained)
            assert ex.labels[first:last + 1] == ex.input_ids[first:last + 1] and len(at) == last - first + 1
        # both sides start from the same prompt tokens
        n = next(t for t in range(len(p.chosen.labels)) if p.chosen.labels[t] != IGNORE)
        assert p.rejected.input_ids[:n - 1] == p.chosen.input_ids[:n - 1]
    city = CITIES[2]  # the implicit-prompt record: the chosen completion is the city and the end of turn
    text = tok.decode([y for y in pairs[2].chosen.labels if y != IGNORE])
    assert text.startswith(city) and "<|im_end|>" in text and "Which city" not in text


def test_implicit_prompt_of_strings_splits_at_a_space(setup):
    _, path = setup
    tok = mc.load_tokenizer(path)
    p = make_pair({"chosen": "Q: capital? A: Paris", "rejected": "Q: capital? A: Pasta"}, tok, "f:1")
    trained = tok.decode([y for y in p.chosen.labels if y != IGNORE], skip_special_tokens=True)
    assert trained == " Paris"


@pytest.mark.parametrize("record,match", [
    ({"prompt": "x", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
    ({"prompt": "x", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "must both be strings"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}, "'prompt' must be a str"),
    ({"chosen": "Paris", "rejected": "Lima"}, "share a beginning"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "a"}]}, "share a beginning"),
])
def test_bad_records_name_file_and_line(prefs, tmp_path, record, match):
    _, path = prefs
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "chosen": " a", "rejected": " b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=match) as e:
        load_preferences(f, mc.load_tokenizer(path))
    assert f"{f}:2" in str(e.value)


def test_truncation_keeps_pairs_with_a_trained_token(prefs, tmp_path):
    _, path = prefs
    tok = mc.load_tokenizer(path)
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps({"prompt": "Where? " * 40, "chosen": " Here.", "rejected": " There."}) + "\n" +
                 json.dumps({"prompt": "Where?", "chosen": " Here.", "rejected": " There."}) + "\n")
    said = []
    pairs = load_preferences(f, tok, max_length=20, report=said.append)
    assert len(pairs) == 1 and "1 dropped" in said[0]
    with pytest.raises(DataError, match="no pair left"):
        load_preferences(f, tok, max_length=3)


# -- log-probs and references -------------------------------------------------------------------------

def test_batched_sequence_logps_equal_one_row_at_a_time(prefs):
    """The concatenated, right-padded 2B-row forward gives each row's own log-probability."""
    _, path = prefs
    model = policy(path)
    pairs = load(prefs)[:5]
    batch = pair_batch(pairs, 0)
    ours = BaseReference(model)(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), 7)
    with mc.disable_adapters(model):
        theirs = row_logps(model, pairs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # fp32; padding changes the sum order


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "adapter", "llama-adapter", "prefix", "prompt",
                                    "ptuning", "qlora"])
def test_adapters_disabled_reference_is_exactly_the_base(prefs, method):
    _, path = prefs
    pairs = load(prefs)[:4]
    batch = pair_batch(pairs, 0)
    base = mc.load_model(path)
    if method == "qlora":
        mc.quantize_model(base)
    expected = _plain_logps(base, batch)
    model = policy(path, method, **({"adapter_layers": 2} if method == "llama-adapter" else {}))
    ref = BaseReference(model)(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), 64)
    assert torch.equal(ref, expected)
    assert not torch.equal(_plain_logps(model, batch), expected)  # the adapter does change the policy


def _plain_logps(model, batch):
    from minicustom.losses import sequence_logps

    with torch.no_grad():
        h = model.forward_hidden(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return sequence_logps(h, batch["labels"], model.lm_head, 64)[0]


def test_snapshot_reference_is_the_starting_point(prefs):
    """After a step the snapshot still answers with the starting tensors, and the live ones are back."""
    _, path = prefs
    pairs = load(prefs)[:4]
    batch = pair_batch(pairs, 0)
    model = policy(path)
    start = _plain_logps(model, batch)
    snap = SnapshotReference(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)
    moved = _plain_logps(model, batch)
    assert torch.equal(snap(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), 64), start)
    assert torch.equal(_plain_logps(model, batch), moved) and not torch.equal(moved, start)


@pytest.mark.parametrize("reference", ["base", "snapshot", "model"])
def test_step_zero_loss_is_log2_when_the_reference_is_the_policy(prefs, reference):
    """h = 0 for every pair, so -log sigma(0) = log 2 exactly and every reward is 0. A fresh LoRA (B = 0)
    is the base; a snapshot or a separate copy of the model is the policy itself."""
    _, path = prefs
    pairs = load(prefs)[:6]
    if reference == "base":
        model, ref = policy(path, randomize=False), "base"
    elif reference == "snapshot":
        model, ref = policy(path), "snapshot"
    else:
        model, ref = policy(path, "full"), mc.load_model(path)
    from minicustom.train.dpo import make_reference

    loss_module = DPOLoss(model, make_reference(model, ref), DPOConfig())
    batch = pair_batch(pairs, 0)
    batch["pair_mask"] = torch.ones(len(pairs), dtype=torch.long)
    total, stats = loss_module(**batch)
    assert torch.equal(total, LOG2 * len(pairs)) or torch.allclose(total, LOG2 * len(pairs), rtol=1e-6, atol=0)
    assert stats["rewards/chosen"] == 0 and stats["rewards/rejected"] == 0 and stats["rewards/accuracies"] == 0


def test_gradient_flows_to_the_policy_only(prefs):
    _, path = prefs
    pairs = load(prefs)[:3]
    model = policy(path)
    loss_module = DPOLoss(model, SnapshotReference(model), DPOConfig())
    batch = pair_batch(pairs, 0)
    batch["pair_mask"] = torch.ones(len(pairs), dtype=torch.long)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss_module(**batch)[0].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


def test_accumulation_equals_one_batch(prefs):
    """k micro-batches of one pair == one batch of k pairs: the mean loss and the gradients."""
    _, path = prefs
    pairs = load(prefs)[:4]
    model = policy(path)
    wrapper = DPOLoss(model, SnapshotReference(model), DPOConfig(beta=0.5))
    with torch.no_grad():  # move off the snapshot, so that h != 0 and the gradients are not all alike
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)

    def batches(groups):
        out = []
        for g in groups:
            b = pair_batch(g, 0)
            b["pair_mask"] = torch.ones(len(g), dtype=torch.long)
            out.append(b)
        return out
    weight = lambda b: int(b["pair_mask"].sum())  # noqa: E731
    loss_a, n_a, _, stats_a = accumulate_gradients(wrapper, batches([[p] for p in pairs]), "cpu", weight=weight)
    g_a = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss_b, n_b, _, stats_b = accumulate_gradients(wrapper, batches([pairs]), "cpu", weight=weight)
    g_b = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert n_a == n_b == 4 and g_a.keys() == g_b.keys() and g_a
    assert abs(loss_a - loss_b) < 1e-6 and abs(loss_a - math.log(2)) > 1e-3
    for k in stats_a:
        assert abs(stats_a[k] - stats_b[k]) < 1e-4 * max(1, abs(stats_a[k])), k
    for n in g_a:
        scale = g_b[n].abs().max()
        torch.testing.assert_close(g_a[n] / scale, g_b[n] / scale, rtol=0, atol=1e-5, msg=n)


# -- the trainer --------------------------------------------------------------------------------------

def losses_of(history):
    return [r["loss"] for r in history if "loss" in r]


def test_precomputed_and_live_reference_give_identical_losses(prefs, tmp_path):
    """One pair per micro-batch on both sides, so the reference forward sees the same rows and padding:
    the precomputed log-probs are the live ones, bit for bit, and so are the losses. A second run reads
    the cache; other data, or another starting adapter, is another key."""
    _, path = prefs
    pairs, eval_pairs = load(prefs), load(prefs, "prefs_eval.jsonl")
    config = DPOConfig(batch_size=1, grad_accum=2, max_steps=3, lr=1e-2, beta=0.5)
    runs = {}
    for reference in ("base", "precomputed", "precomputed"):
        model = policy(path, randomize=False)
        said = []
        runs.setdefault(reference, []).append(train_dpo(
            model, pairs, config, tmp_path / f"{reference}{len(runs.get(reference, []))}", reference=reference,
            eval_pairs=eval_pairs, reference_cache=tmp_path / "cache", report=said.append))
        if reference == "precomputed":
            assert any("cached" in s for s in said) == (len(runs[reference]) == 2)
    live, pre, again = runs["base"][0], *runs["precomputed"]
    assert losses_of(live) == losses_of(pre) == losses_of(again)
    assert live[0]["eval_loss"] == pre[0]["eval_loss"] and abs(live[0]["eval_loss"] - math.log(2)) < 1e-6
    assert live[-1]["loss"] != live[1]["loss"]  # it trained
    model = policy(path, randomize=False)
    key = reference_key(model, pairs)
    assert reference_key(model, pairs[:-1])["data"] != key["data"]
    assert reference_key(policy(path), pairs)["adapter"] != key["adapter"]
    assert reference_key(model, pairs) == key


def test_precompute_recovers_from_a_damaged_cache(prefs, tmp_path):
    _, path = prefs
    pairs = load(prefs)[:3]
    model = policy(path)
    config = DPOConfig(batch_size=2)
    first = precompute_reference(model, pairs, config, tmp_path, report=lambda *a: None)
    (cached,) = tmp_path.glob("*.safetensors")
    cached.write_bytes(b"garbage")
    said = []
    again = precompute_reference(model, pairs, config, tmp_path, report=said.append)
    assert torch.equal(first, again) and "unreadable" in said[0]


def test_resume_after_kill_reproduces_the_run(prefs, tmp_path):
    _, path = prefs
    pairs, eval_pairs = load(prefs), load(prefs, "prefs_eval.jsonl")
    config = DPOConfig(batch_size=2, max_steps=4, save_every=2, eval_every=2, lr=1e-2)
    straight = train_dpo(policy(path), pairs, config, tmp_path / "a", reference="snapshot", eval_pairs=eval_pairs)

    def kill(step, record):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_dpo(policy(path), pairs, config, tmp_path / "b", reference="snapshot", eval_pairs=eval_pairs,
                  on_step=kill)
    resumed = train_dpo(policy(path), pairs, config, tmp_path / "b", reference="snapshot", eval_pairs=eval_pairs,
                        resume=True)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert drop(resumed) == drop(straight)


def test_metrics_show_policy_and_reference_separately(prefs, tmp_path):
    _, path = prefs
    pairs = load(prefs)
    history = train_dpo(policy(path), pairs, DPOConfig(batch_size=4, max_steps=2), tmp_path, reference="snapshot",
                        eval_pairs=pairs[:4])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(history))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "ref_logps/chosen", "ref_logps/rejected", "policy_accuracy", "pairs"):
        assert key in rows[1] and f"eval_{key}" in rows[-1] or key == "pairs", key
    r = rows[1]
    beta = 0.1
    assert abs(r["rewards/chosen"] - beta * (r["logps/chosen"] - r["ref_logps/chosen"])) < 1e-5
    assert abs(r["rewards/margins"] - (r["rewards/chosen"] - r["rewards/rejected"])) < 1e-5
    assert r["pairs"] == 4 and (tmp_path / "loss.png").is_file()


@pytest.mark.parametrize("method", ["lora", "ia3", "adapter", "llama-adapter", "prefix", "prompt", "ptuning",
                                    "qlora", "full"])
def test_every_method_trains(prefs, tmp_path, method):
    """One step of every method: a finite loss, trainable tensors moved, frozen ones untouched."""
    _, path = prefs
    pairs = load(prefs)[:4]
    model = policy(path, method, randomize=False, **({"adapter_layers": 2} if method == "llama-adapter" else {}))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = mc.load_model(path) if method == "full" else "base"
    history = train_dpo(model, pairs, DPOConfig(batch_size=4, max_steps=1, lr=1e-2), tmp_path,
                        reference=reference)
    assert math.isfinite(history[-1]["loss"])
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved and moved <= trainable


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust", "simpo", "orpo", ["sigmoid", "sft"]])
def test_other_losses_train(prefs, tmp_path, loss):
    _, path = prefs
    config = DPOConfig(batch_size=4, max_steps=2, loss_type=loss, lr=1e-2,
                       label_smoothing=0.1 if loss == "robust" else 0.0)
    history = train_dpo(policy(path, randomize=False), load(prefs)[:8], config, tmp_path,
                        reference=None if loss in ("simpo", "orpo") else "base")
    assert all(math.isfinite(r["loss"]) for r in history)


def test_reference_errors(prefs, tmp_path):
    _, path = prefs
    pairs = load(prefs)[:4]
    with pytest.raises(ValueError, match="pass reference="):
        train_dpo(policy(path), pairs, DPOConfig(max_steps=1), tmp_path / "a")
    with pytest.raises(ValueError, match="has none"):
        train_dpo(policy(path, "full"), pairs, DPOConfig(max_steps=1), tmp_path / "b", reference="base")
    with pytest.raises(ValueError, match="no such folder"):
        train_dpo(policy(path), pairs, DPOConfig(max_steps=1), tmp_path / "c", reference=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown loss type"):
        DPOConfig(loss_type="dpo")
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train_dpo(policy(path), pairs, DPOConfig(max_steps=1), tmp_path / "d", reference="base")
        train_dpo(policy(path), pairs, DPOConfig(max_steps=1), tmp_path / "d", reference="base")


# -- the command line ---------------------------------------------------------------------------------

def dpo_cli(prefs, out, *extra):
    root, path = prefs
    main(["train", "dpo", "--model", str(path), "--data", str(root / "prefs.jsonl"), "--eval-data",
          str(root / "prefs_eval.jsonl"), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
          "--r", "4", "--reference-cache", str(out.parent / "cache"), *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_new_adapter_then_dpo_from_it(prefs, tmp_path, capsys):
    """A new LoRA against the base; then DPO starting from that adapter, which must name its reference:
    the snapshot starts at log 2 (the reference is the starting adapter), the base does not."""
    rows = dpo_cli(prefs, tmp_path / "first", "--lr", "1e-2")
    assert abs(rows[0]["eval_loss"] - math.log(2)) < 1e-6 and rows[-1]["eval_loss"] != rows[0]["eval_loss"]
    assert (tmp_path / "first" / "adapter_model.safetensors").is_file()
    with pytest.raises(SystemExit, match="needs an explicit reference"):
        dpo_cli(prefs, tmp_path / "second", "--adapter", str(tmp_path / "first"))
    snap = dpo_cli(prefs, tmp_path / "snap", "--adapter", str(tmp_path / "first"), "--reference", "adapter-snapshot")
    base = dpo_cli(prefs, tmp_path / "base", "--adapter", str(tmp_path / "first"), "--reference", "base")
    assert abs(snap[0]["eval_loss"] - math.log(2)) < 1e-6
    assert base[0]["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], abs=1e-5)  # where the first run ended
    pre = dpo_cli(prefs, tmp_path / "pre", "--adapter", str(tmp_path / "first"), "--reference", "precomputed")
    assert [r["loss"] for r in pre[1:]] == pytest.approx([r["loss"] for r in snap[1:]], abs=1e-5)


def test_cli_full_fine_tuning_needs_a_reference(prefs, tmp_path):
    _, path = prefs
    with pytest.raises(SystemExit, match="needs an explicit reference"):
        dpo_cli(prefs, tmp_path / "a", "--method", "full")
    rows = dpo_cli(prefs, tmp_path / "b", "--method", "full", "--reference", str(path), "--lr", "1e-4")
    assert abs(rows[0]["eval_loss"] - math.log(2)) < 1e-6
    assert (tmp_path / "b" / "model.safetensors").is_file() or list((tmp_path / "b").glob("*.safetensors"))


def test_cli_loss_options(prefs, tmp_path):
    rows = dpo_cli(prefs, tmp_path / "a", "--loss", "sigmoid,sft", "--loss-weights", "1,0.5", "--beta", "0.3")
    assert rows[0]["eval_loss"] > math.log(2)  # the NLL term adds to log 2
    with pytest.raises(SystemExit, match="unknown loss type"):
        dpo_cli(prefs, tmp_path / "b", "--loss", "sigmoid,nope")


def test_label_smoothing_bounds_follow_the_loss():
    """A flip rate stays below 0.5 (chosen and rejected alike at 0.5); exo_pair's epsilon may reach past it."""
    assert DPOConfig(loss_type="exo_pair", label_smoothing=0.7).label_smoothing == 0.7
    for kw, says in [(dict(label_smoothing=0.5), r"\[0, 0.5\) for sigmoid"),
                     (dict(loss_type=["exo_pair", "sigmoid"], label_smoothing=0.7), r"\[0, 0.5\) for exo_pair\+sigmoid"),
                     (dict(loss_type="exo_pair", label_smoothing=1.0), r"\[0, 1\) for exo_pair"),
                     (dict(loss_type="exo_pair", label_smoothing=0.0), r"'exo_pair' ε, e.g. 1e-3\) must be in \(0, 1\)")]:
        with pytest.raises(ValueError, match=says):
            DPOConfig(**kw)
