"""KTO training: unpaired data (and pairs split in two), the batch's mismatched KL rows and its reduction
against TRL 1.16's KTOTrainer, the trainer on the shared loop (it learns, it resumes bit for bit), and the
command.

The per-example loss and the KL estimate are checked number by number in test_rl_losses.py; here the claims
are about what feeds them. TRL oracle (kto_trainer.py in the venv's trl 1.16): _prepare_dataset builds each
example's KL completion by rotating the completions of each chunk of per_device_train_batch_size rows by one
(1150-1156), DataCollatorForUnpairedPreference joins it to the example's prompt (163-199), and _compute_loss
reduces the batch (1443-1548). Both sides are fed the same log-probs: the stub model of TRL's side runs our
model's forward_hidden + sequence_logps on TRL's tensors, the mask only where a row is padded as our collate
does, so when the rows are the same the log-probs are bit-identical, and the loss and its gradient differ only
by the order of a few fp32 sums (B ≤ 3 terms of O(1): ~1e-7 relative; rtol 1e-6 for the loss, 1e-5 for the
gradients, which sum such terms over every token).
"""

import argparse
import collections
import contextlib
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import CITIES

import minicustom as mc
from minicustom.cli_kto import add_train_kto
from minicustom.data import IGNORE, DataError, load_preferences
from minicustom.losses import sequence_logps
from minicustom.methods import apply_method, disable_adapters
from minicustom.train.dpo import make_reference
from minicustom.train.kto import (
    KTOConfig,
    KTOTask,
    Unpaired,
    kto_metrics,
    load_unpaired,
    train_kto,
)
from minicustom.train.loop import accumulate_gradients
from minicustom.train.state import TrainingError

ROOT = Path(__file__).parents[1]
QUIET = dict(report=lambda *a: None)


def unpaired_records():
    """Strings and message lists, desirable and undesirable mixed."""
    rows = []
    for i, city in enumerate(CITIES):
        other = CITIES[(i + 5) % len(CITIES)]
        good = i % 3 != 1
        if i % 2:
            rows.append({"prompt": [{"role": "user", "content": f"Name a city like {city}."}],
                         "completion": [{"role": "assistant", "content": city if good else f"Maybe {other}"}],
                         "label": good})
        else:
            rows.append({"prompt": f"Where is {city}?", "completion": f" In {city}." if good else f" In {other}.",
                         "label": good})
    return rows


def pair_records(n=12):
    return [{"prompt": f"Where is {c}?", "chosen": f" In {c}.", "rejected": f" In {CITIES[(i + 5) % 12]}, I think."}
            for i, c in enumerate(CITIES[:n])]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def kto(setup):
    root, path = setup
    write(root / "kto.jsonl", unpaired_records())
    write(root / "kto_pairs.jsonl", pair_records())
    write(root / "kto_pairs_eval.jsonl", pair_records(5))
    return root, path


def load(kto, name="kto.jsonl", **kw):
    root, path = kto
    return load_unpaired(root / name, mc.load_tokenizer(path), **{"max_length": 128, **QUIET, **kw})


def policy(path, randomize=True, **hp):
    model = mc.load_model(path)
    torch.manual_seed(0)
    apply_method(model, "lora", r=4, **hp)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


# -- data ---------------------------------------------------------------------------------------------

def test_unpaired_records_keep_prompt_and_completion_apart(kto):
    items = load(kto)
    assert len(items) == len(CITIES) and [u.desirable for u in items] == [r["label"] for r in unpaired_records()]
    for u in items:
        row = u.row()
        assert row.input_ids == u.prompt + u.completion and row.labels[:len(u.prompt)] == [IGNORE] * len(u.prompt)
        assert u.labels[0] == u.completion[0] != IGNORE  # the completion starts at the first trained token
        assert all(y in (c, IGNORE) for y, c in zip(u.labels, u.completion))
    _, path = kto
    tok = mc.load_tokenizer(path)
    assert tok.decode(items[0].completion, skip_special_tokens=True) == " In Paris."
    assert "<|im_start|>assistant" in tok.decode(items[1].prompt)  # the chat prompt ends on the assistant header


def test_paired_file_is_split_into_two_records_per_pair(kto):
    root, path = kto
    pairs = load_preferences(root / "kto_pairs.jsonl", mc.load_tokenizer(path), max_length=128)
    items = load(kto, "kto_pairs.jsonl")
    assert len(items) == 2 * len(pairs) and [u.desirable for u in items] == [True, False] * len(pairs)
    for p, chosen, rejected in zip(pairs, items[0::2], items[1::2]):
        assert (chosen.row().input_ids, chosen.row().labels) == (p.chosen.input_ids, p.chosen.labels)
        assert (rejected.row().input_ids, rejected.row().labels) == (p.rejected.input_ids, p.rejected.labels)
        assert chosen.prompt == rejected.prompt and chosen.source == rejected.source == p.source


@pytest.mark.parametrize("labels", [[True, True, True], [False, False]], ids=["no_undesirable", "no_desirable"])
def test_a_file_without_both_labels_is_refused(kto, tmp_path, labels):
    rows = [{"prompt": "Where is Lima?", "completion": " In Peru.", "label": x} for x in labels]
    f = write(tmp_path / "one_sided.jsonl", rows)
    good = sum(labels)
    with pytest.raises(DataError, match=rf"one_sided.jsonl: {good} desirable and {len(labels) - good} undesirable"):
        load(kto, f)


def test_truncation_that_leaves_one_side_says_so(kto, tmp_path):
    """Drop: the long undesirable example goes, and the refusal says why none is left."""
    rows = [{"prompt": "Where is Lima?", "completion": " In Peru.", "label": True},
            {"prompt": "Where is Lima?", "completion": " In " + "a very long place " * 20, "label": False}]
    f = write(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError, match=r"1 desirable and 0 undesirable examples \(after 1 too long were dropped\)"):
        load(kto, f, max_length=24, truncation="drop")
    said = []
    items = load(kto, f, max_length=24, report=said.append)
    assert len(items) == 2 and len(items[1].row()) == 24 and "1 examples longer than 24 tokens truncated" in said[0]


@pytest.mark.parametrize("record, match", [
    ({"prompt": "a", "completion": "b", "label": "true"}, r":2: field 'label' must be true or false .*'true' \(str\)"),
    ({"prompt": "a", "completion": "b", "label": 1}, r":2: field 'label' must be true or false .*1 \(int\)"),
    ({"prompt": "a", "completion": "b"}, r":2: an unpaired record needs .* field 'label' is missing"),
    ({"prompt": "a", "label": False}, r":2: .* field 'completion' is missing"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, r":2: a paired record .* first record \(.*:1\) is unpaired"),
    ({"prompt": "a", "completion": ["b"], "label": False}, r":2: 'prompt' and 'completion' must both be strings"),
])
def test_bad_records_name_file_line_and_field(kto, tmp_path, record, match):
    f = write(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "y", "label": True}, record])
    with pytest.raises(DataError, match="bad.jsonl" + match):
        load(kto, f)


# -- the batch against TRL ----------------------------------------------------------------------------

def trl_prepared(path, records, batch_size):
    """TRL's own _prepare_dataset (on a stub trainer): tokenized prompt/completion and the KL completions."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOTrainer

    tok = AutoTokenizer.from_pretrained(str(path))
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=64, per_device_train_batch_size=batch_size)
    stub = types.SimpleNamespace(_tokenizer=tok, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    return KTOTrainer._prepare_dataset(stub, Dataset.from_list(records), tok, args, "train"), tok.pad_token_id


def stub_model(model):
    """TRL's model call: per-token log-probs (rows, L − 1) whose row sums are our sequence log-probs, computed as
    KTOLoss computes them (mask only on padded batches), so equal rows give bit-identical sums."""
    def call(input_ids, attention_mask, labels, use_cache, fused_lm_head):
        mask = None if bool(attention_mask.all()) else attention_mask
        sums = sequence_logps(model.forward_hidden(input_ids, attention_mask=mask), labels, model.lm_head)[0]
        per_token = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
        per_token = torch.cat([sums[:, None], per_token[:, 1:]], 1)
        return types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token.detach()),
                                     mean_logits=torch.zeros_like(per_token.detach()))
    return call


def trl_loss(model, batch, beta, w_d, w_u):
    """KTOTrainer._compute_loss, train mode, one process, reference log-probs (the base: adapters disabled)
    given in the batch as precompute_ref_log_probs gives them."""
    from trl import KTOTrainer

    call = stub_model(model)
    with torch.no_grad(), disable_adapters(model):
        for prefix in ("", "KL_"):
            labels = batch[f"{prefix}input_ids"].masked_fill(batch[f"{prefix}completion_mask"] == 0, -100)
            batch[f"ref_{prefix}logps"] = call(batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], labels,
                                               False, True).log_probs.sum(-1)
    accelerator = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x)
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=accelerator, calculate_KL=True,
        precompute_ref_logps=True, aux_loss_enabled=False, loss_type="kto", beta=beta, desirable_weight=w_d,
        undesirable_weight=w_u, _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    stub._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stub)
    return KTOTrainer._compute_loss(stub, call, batch, False), {k: v[-1] for k, v in stub._metrics["train"].items()}


def test_kl_rows_and_batch_loss_match_trl(kto):
    """7 examples in chunks of 3: TRL's KL rows (x_1, y_3), (x_2, y_1), (x_3, y_2), and the last chunk's one
    example with its own completion, are ours; the loss, KL, rewards and gradients of each batch are TRL's;
    and a step of two micro-batches is the mean of TRL's two batch losses (TRL's accumulation)."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    _, path = kto
    records = [{"prompt": f"Where is {c}?", "completion": f" In {c}{'!' * i}.", "label": i % 3 == 0}
               for i, c in enumerate(CITIES[:7])]
    data, pad = trl_prepared(path, records, batch_size=3)
    items = [Unpaired(r["prompt_ids"], r["completion_ids"], r["completion_ids"], r["label"], f"trl:{i}")
             for i, r in enumerate(data)]
    model = policy(path)
    beta, w_d, w_u = 0.5, 1.33, 0.7
    task = KTOTask(items, KTOConfig(batch_size=3, max_length=64, beta=beta, desirable_weight=w_d,
                                    undesirable_weight=w_u), make_reference(model, "base"), pad)
    module, trl_losses = task.loss_module(model), []
    collator = DataCollatorForUnpairedPreference(pad_token_id=pad, max_length=64)
    for chunk in ([0, 1, 2], [3, 4, 5], [6]):
        ours, theirs = task.batch(chunk), collator.torch_call([data[i] for i in chunk])
        for mine, prefix in (("", ""), ("kl_", "KL_")):
            assert torch.equal(ours[f"{mine}input_ids"], theirs[f"{prefix}input_ids"])
            labels = theirs[f"{prefix}input_ids"].masked_fill(theirs[f"{prefix}completion_mask"] == 0, IGNORE)
            assert torch.equal(ours[f"{mine}labels"], labels)
            assert torch.equal(ours.get(f"{mine}attention_mask", torch.ones_like(labels)),
                               theirs[f"{prefix}attention_mask"])
        model.zero_grad()
        theirs_loss, logged = trl_loss(model, theirs, beta, w_d, w_u)
        theirs_loss.backward()
        theirs_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        loss_sum, stats = module(**ours)
        (loss_sum / len(chunk)).backward()
        torch.testing.assert_close(loss_sum / len(chunk), theirs_loss, rtol=1e-6, atol=1e-7)
        ours_logged = kto_metrics(stats)
        for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert (key in ours_logged) == (key in logged), key
            if key in logged:
                assert ours_logged[key].item() == pytest.approx(logged[key], rel=1e-6, abs=1e-7), key
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, theirs_grads[n], rtol=1e-5, atol=1e-7 * theirs_grads[n].abs().max())
        trl_losses.append(theirs_loss.item())
    assert trl_losses[0] != trl_losses[1] and logged["kl"] >= 0
    model.zero_grad()
    mean, weight, _, _ = accumulate_gradients(module, [task.batch([0, 1, 2]), task.batch([3, 4, 5])], "cpu", 1,
                                              task.weight)
    assert weight == 6 and mean == pytest.approx((trl_losses[0] + trl_losses[1]) / 2, rel=1e-6)


@pytest.mark.slow  # torchrun starts two processes
def test_reference_point_is_the_mean_over_processes_then_clamped(tmp_path):
    """Process 0's batch estimate is 1.5, process 1's −1.25: TRL's z0 is mean(1.5, −1.25) = 0.125 (clamping each
    first would give 0.75); a filler share (process 1's, real=False) is left out: 1.5."""
    script = tmp_path / "z0.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from minicustom.train.kto import reference_point\n"
        "dist.init_process_group('gloo')\n"
        "r = dist.get_rank()\n"
        "policy, ref = torch.tensor([[1.0, 2.0], [0.5, -3.0]])[r], torch.zeros(2)\n"
        "values = [reference_point(policy, ref).item(), reference_point(policy, ref, real=r == 0).item()]\n"
        f"open(f'{tmp_path}/z0-{{r}}.txt', 'w').write(' '.join(map(str, values)))\n"
        "dist.destroy_process_group()\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # each process writes its own file: two processes printing to one pipe can interleave their lines
    values = [[float(x) for x in (tmp_path / f"z0-{r}.txt").read_text().split()] for r in (0, 1)]
    assert values == [[0.125, 1.5], [0.125, 1.5]]


# -- the trainer --------------------------------------------------------------------------------------

def test_training_lowers_the_loss_and_logs_trl_metrics(kto, tmp_path):
    """Step 0, the policy equal to its reference: every log-ratio and z0 are 0, each loss w/2 = 0.5, every
    reward tied (implicit-reward accuracy 0). Then the held-out KTO loss falls, and the metrics are TRL's means."""
    root, path = kto
    items, eval_pairs = load(kto, "kto_pairs.jsonl"), load_preferences(root / "kto_pairs.jsonl",
                                                                      mc.load_tokenizer(path), max_length=128)
    config = KTOConfig(batch_size=4, max_steps=6, lr=2e-2, eval_every=6, schedule="constant")
    history = train_kto(policy(path, randomize=False), items, config, tmp_path, reference="base",
                        eval_pairs=eval_pairs)
    start, end = history[0], history[-1]
    assert start["eval_loss"] == 0.5 and start["eval_kl"] == 0 and start["eval_rewards/accuracies"] == 0
    assert end["eval_loss"] < start["eval_loss"] - 0.01
    assert end["eval_rewards/accuracies"] > 0.5 and 0 <= end["eval_policy_accuracy"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(history)) and all(r["examples"] == 4 for r in rows[1:])
    for r in rows[1:]:
        if "sum/kl" not in r:  # the loop hands the step's sums to KTOTask.step_metrics: TRL's means
            assert r["kl"] >= 0 and ("rewards/chosen" in r or "rewards/rejected" in r)
            if "rewards/chosen" in r and "rewards/rejected" in r:
                assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"])
        else:  # a loop without the hook logs the sums and counts over the examples: their ratios are the means
            assert kto_metrics(r)["kl"] >= 0 and r["count/chosen"] + r["count/rejected"] == pytest.approx(1)


def test_resume_after_kill_reproduces_the_run(kto, tmp_path):
    root, path = kto
    items, eval_items = load(kto), load(kto)[:6]
    config = KTOConfig(batch_size=3, max_steps=4, save_every=2, eval_every=2, lr=1e-2)
    straight = train_kto(policy(path, dropout=0.1), items, config, tmp_path / "a", reference="snapshot",
                         eval_examples=eval_items)

    def kill(step, record):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_kto(policy(path, dropout=0.1), items, config, tmp_path / "b", reference="snapshot",
                  eval_examples=eval_items, on_step=kill)
    resumed = train_kto(policy(path, dropout=0.1), items, config, tmp_path / "b", reference="snapshot",
                        eval_examples=eval_items, resume=True)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert drop(resumed) == drop(straight) and straight[-1]["loss"] != straight[1]["loss"]
    with pytest.raises(TrainingError, match="training data differs"):  # other labels are other data
        flipped = [Unpaired(u.prompt, u.completion, u.labels, not u.desirable, u.source) for u in items]
        train_kto(policy(path, dropout=0.1), flipped, config, tmp_path / "b", reference="snapshot", resume=True)


def test_config_and_reference_errors(kto, tmp_path):
    _, path = kto
    items = load(kto)
    for bad, match in ((dict(beta=0.0), "beta must be > 0"), (dict(batch_size=1), "batch_size must be >= 2"),
                       (dict(desirable_weight=-1.0), "desirable_weight must be >= 0"),
                       (dict(desirable_weight=0.0, undesirable_weight=0.0), "both 0")):
        with pytest.raises(ValueError, match=match):
            KTOConfig(**bad)
    for reference, match in ((None, "compares the policy with a reference"), ("precomputed", "cannot be computed once"),
                             (str(tmp_path / "nope"), "no such folder")):
        with pytest.raises(ValueError, match=match):
            train_kto(policy(path), items, KTOConfig(max_steps=1), tmp_path / "x", reference=reference)
    with pytest.raises(DataError, match="kto.jsonl: 8 desirable and 0 undesirable"):
        train_kto(policy(path), [u for u in items if u.desirable], KTOConfig(max_steps=1), tmp_path / "y",
                  reference="base")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# -- the command line ---------------------------------------------------------------------------------

def kto_cli(kto, out, *extra, data="kto.jsonl", eval_data="kto_pairs_eval.jsonl"):
    root, path = kto
    parser = argparse.ArgumentParser()
    add_train_kto(parser.add_subparsers(dest="kind"))
    args = parser.parse_args(["kto", "--model", str(path), "--data", str(root / data), "--eval-data",
                              str(root / eval_data), "--out", str(out), "--max-steps", "2", "--batch-size", "3",
                              "--r", "4", "--max-length", "128", *extra])
    with contextlib.redirect_stdout(None):
        args.func(args)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_from_unpaired_or_paired_data(kto, tmp_path):
    rows = kto_cli(kto, tmp_path / "a", "--lr", "1e-2", "--beta", "0.2", "--undesirable-weight", "1.5")
    assert rows[0]["eval_loss"] == pytest.approx(0.5 * (1 + 1.5) / 2) and "eval_rewards/accuracies" in rows[-1]
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert saved["beta"] == 0.2 and saved["undesirable_weight"] == 1.5 and saved["lr"] == 1e-2
    rows = kto_cli(kto, tmp_path / "b", data="kto_pairs.jsonl", eval_data="kto.jsonl")
    assert math.isfinite(rows[-1]["loss"]) and "eval_rewards/accuracies" not in rows[-1]
    snap = kto_cli(kto, tmp_path / "c", "--adapter", str(tmp_path / "a"), "--reference", "adapter-snapshot")
    assert snap[0]["eval_loss"] == pytest.approx(0.5) and snap[0]["eval_kl"] == 0


@pytest.mark.parametrize("extra, match", [
    (["--reference", "precomputed"], "cannot be computed once"),
    (["--method", "full"], "needs an explicit reference"),
    (["--reference", "/no/such/folder"], "not base, adapter-snapshot or a folder"),
])
def test_cli_reference_errors_write_nothing(kto, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        kto_cli(kto, tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists()


def test_cli_batch_size_one_is_a_usage_error(kto, tmp_path, capsys):
    with pytest.raises(SystemExit):
        kto_cli(kto, tmp_path / "out", "--batch-size", "1")
    assert "argument --batch-size: must be >= 2, got 1" in capsys.readouterr().err
