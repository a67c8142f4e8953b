"""Reward models: the score read where transformers reads it, folders both ways with transformers,
training on the shared loop (LoRA and full, the head trained, resumed bit for bit), the command, and the
folders and tokenizers refused.

The Bradley–Terry loss itself is checked against TRL in test_rl_losses.py::test_reward_loss_matches_trl.
"""

import argparse
import json
import os
import signal

import pytest
import torch
from conftest import CITIES, make_checkpoint
from safetensors.torch import load_file

import minicustom as mc
from minicustom.checkpoint import CheckpointError
from minicustom.cli_rm import add_train_rm, cmd_train_rm
from minicustom.data import load_preferences
from minicustom.losses import reward_loss
from minicustom.methods import REGISTRY, apply_method
from minicustom.reward_model import (
    RewardModel,
    RewardModelError,
    check_same_tokenizer,
    last_token_positions,
    load_reward_model,
    save_reward_model,
)
from minicustom.train.rm import RMConfig, RMLoss, RMTask, train_rm
from minicustom.train.state import Interrupted

# Right padding with pad id 0, rows of different lengths; the last row's real tokens END in the pad id (the
# trap: transformers reads it at position 2, the token before, and so must we).
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0], [14, 15, 0, 0, 0, 0], [3, 4, 5, 0, 0, 0]])
MASK = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])


def spread(model, seed=0):
    """Weights redrawn with a large spread, as conftest does, so that a misread position shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.2 * torch.randn(p.shape, generator=g))
    return model


def new_rm(path, seed=0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel.from_causal_lm(mc.load_model(path))


def hf_scores(folder, ids=IDS, mask=MASK):
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits[:, 0]


def test_the_scored_position_is_transformers_rule():
    """The rightmost token that is not the pad id ((arange * keep).argmax, ties -> 0), within the mask."""
    ids = torch.tensor([[5, 6, 0, 0], [0, 5, 6, 7], [5, 0, 6, 0], [0, 0, 0, 0], [5, 6, 7, 9]])
    assert last_token_positions(ids, 0).tolist() == [1, 3, 2, 0, 3]
    mask = torch.tensor([[1, 1, 1, 1]] * 4 + [[1, 1, 0, 0]])  # another pad id (9) than the config's: the mask
    assert last_token_positions(ids, 0, mask).tolist() == [1, 3, 2, 0, 1]
    assert last_token_positions(ids, None).tolist() == [3] * 5


@pytest.mark.parametrize("family", ["llama3", "smollm", "qwen2"])
def test_saved_here_scores_the_same_in_transformers(tmp_path, family):
    path, _ = make_checkpoint(tmp_path / "lm", family)
    rm = new_rm(path)
    spread(rm.score)
    save_reward_model(rm, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == [{"qwen2": "Qwen2"}.get(family, "Llama") + "ForSequenceClassification"]
    assert config["id2label"] == {"0": "LABEL_0"} and config["pad_token_id"] == 0
    assert set(load_file(tmp_path / "rm" / "model.safetensors")) == set(rm.state_dict())
    assert "score.weight" in rm.state_dict() and "lm_head.weight" not in rm.state_dict()
    with torch.no_grad():
        ours = rm(IDS, MASK)
    torch.testing.assert_close(ours, hf_scores(tmp_path / "rm"), rtol=1e-4, atol=1e-4)  # fp32, same op order
    assert ours.shape == (4,) and ours.std() > 0.5  # scores that differ: a misread position would show


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_saved_by_transformers_scores_the_same_here(tmp_path, family):
    import transformers

    kind = {"llama": "Llama", "qwen2": "Qwen2"}[family]
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=131, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, num_labels=1, tie_word_embeddings=family == "qwen2")
    torch.manual_seed(0)
    hf = spread(getattr(transformers, f"{kind}ForSequenceClassification")(config).eval())
    hf.save_pretrained(tmp_path / "hf")
    rm = load_reward_model(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(rm(IDS, MASK), hf(input_ids=IDS, attention_mask=MASK).logits[:, 0],
                                   rtol=1e-4, atol=1e-4)
    assert rm.lm_head is None


# -- folders and tokenizers refused ---------------------------------------------------------------------

def edit_config(folder, **fields):
    file = folder / "config.json"
    config = json.loads(file.read_text())
    config.update(fields)
    config = {k: v for k, v in config.items() if v is not None}
    file.write_text(json.dumps(config))


def test_folders_that_are_not_reward_models_are_refused(tmp_path):
    lm, _ = make_checkpoint(tmp_path / "lm", "llama3")
    with pytest.raises(RewardModelError, match=r"config.json: field 'architectures' is \['LlamaForCausalLM'\], a "
                                               "causal language model") as e:
        load_reward_model(lm)
    assert str(lm / "config.json") in str(e.value) and "\n" not in str(e.value)

    rm = new_rm(lm)
    save_reward_model(rm, tmp_path / "rm")
    edit_config(tmp_path / "rm", id2label={"0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1})
    with pytest.raises(RewardModelError, match="field 'id2label' gives 2 labels; a reward model has one"):
        load_reward_model(tmp_path / "rm")
    edit_config(tmp_path / "rm", id2label=None, label2id=None)  # transformers then assumes 2 labels
    with pytest.raises(RewardModelError, match="field 'num_labels' gives 2 labels"):
        load_reward_model(tmp_path / "rm")
    edit_config(tmp_path / "rm", id2label={"0": "LABEL_0"}, pad_token_id=None)
    with pytest.raises(RewardModelError, match="field 'pad_token_id' is None"):
        load_reward_model(tmp_path / "rm")

    # a causal LM's folder relabelled: its weights say what it is, naming the file and the tensor
    edit_config(lm, architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"})
    with pytest.raises(CheckpointError, match="model.safetensors: no tensor score.weight, the head a RewardModel "
                                              "reads; it holds lm_head.weight") as e:
        load_reward_model(lm)
    assert "\n" not in str(e.value)


def test_a_tokenizer_other_than_the_policys_is_refused(setup):
    _, path = setup
    policy, same = mc.load_tokenizer(path), mc.load_tokenizer(path)
    check_same_tokenizer(same, policy)  # the vocabulary is compared, not the object
    other = mc.load_tokenizer(path)
    other.backend.add_tokens(["<extra>"])
    with pytest.raises(RewardModelError, match=r"rm: its tokenizer differs from the policy's \(401 vs 400 tokens; 0 "
                                               r"with other ids, 1 in one only: '<extra>' is only in the reward model's"):
        check_same_tokenizer(other, policy, "rm")
    from tokenizers import Tokenizer, models

    swapped = [Tokenizer(models.WordLevel(v, unk_token="a")) for v in ({"a": 0, "b": 1}, {"a": 1, "b": 0})]
    with pytest.raises(RewardModelError, match="2 with other ids, 0 in one only: 'a' is 0 there, 1 in the policy's"):
        check_same_tokenizer(*swapped)


# -- training -----------------------------------------------------------------------------------------

def pair_rows():
    """Chosen answers say where the city is; rejected ones do not know: separable by a few tokens."""
    rows = []
    for i, city in enumerate(CITIES):
        rows.append({"prompt": f"Where is {city}?", "chosen": f" In {city}.",
                     "rejected": f" No idea, maybe {CITIES[(i + 5) % len(CITIES)]}", "margin": 0.5 * (i % 3)})
    return rows


@pytest.fixture(scope="module")
def prefs(setup):
    root, path = setup
    (root / "rm_prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair_rows()))
    tok = mc.load_tokenizer(path)
    pairs = load_preferences(root / "rm_prefs.jsonl", tok, max_length=64, report=lambda *a: None)
    return root, path, pairs


def test_the_loss_module_sums_reward_loss_over_real_pairs(prefs):
    """Summed per micro-batch (the loop divides by the step's pairs), with margins and centering; a
    filler share contributes zero but still has a graph."""
    _, path, pairs = prefs
    rm = new_rm(path)
    config = RMConfig(center_rewards_coefficient=0.1)
    task = RMTask(pairs[:3], config, 0, margins=[0.0, 0.5, 1.0])
    batch = task.batch([0, 1, 2])
    loss, stats = RMLoss(rm, config)(**batch)
    r = rm(batch["input_ids"], batch.get("attention_mask"))
    expected = 3 * reward_loss(r[:3], r[3:], torch.tensor([0.0, 0.5, 1.0]), 0.1)
    torch.testing.assert_close(loss, expected)
    assert float(stats["accuracy"]) == float((r[:3] > r[3:]).sum())
    filler, _ = RMLoss(rm, config)(**task.batch([0], filler=True))
    filler.backward()
    assert filler.item() == 0.0 and rm.score.weight.grad is not None


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_lowers_the_loss_and_the_export_reloads(prefs, tmp_path, method):
    root, path, pairs = prefs
    rm = new_rm(path)
    apply_method(rm, method, **({"r": 4} if method == "lora" else {}))
    head, frozen = rm.score.weight.detach().clone(), rm.model.layers[0].mlp.up_proj.weight.detach().clone()
    config = RMConfig(lr=1e-2 if method == "lora" else 1e-3, max_steps=6, batch_size=4, schedule="constant",
                      save_every=0)
    history = train_rm(rm, pairs, config, tmp_path / "run", eval_pairs=pairs[:6])
    assert history[-1]["eval_loss"] < history[0]["eval_loss"] - 0.1
    assert history[-1]["eval_accuracy"] > history[0]["eval_accuracy"]
    assert {"accuracy", "margin", "rewards/mean", "pairs"} <= history[1].keys() and "eval_rewards/std" in history[-1]
    assert not torch.equal(rm.score.weight, head)  # the head is trained whatever the method
    assert torch.equal(rm.model.layers[0].mlp.up_proj.weight, frozen) == (method == "lora")
    ckpt = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-000006" / "trainable.safetensors")
    assert "model.score.weight" in ckpt  # the loss module's trainable tensors, the head among them
    batch = RMTask(pairs[:6], config, 0).batch(list(range(6)))
    with torch.no_grad():
        before = rm(batch["input_ids"], batch.get("attention_mask"))
    save_reward_model(rm, tmp_path / "out")  # merges the LoRA in place
    back = load_reward_model(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(back(batch["input_ids"], batch.get("attention_mask")), before,
                                   rtol=1e-5, atol=1e-5)  # merged vs unmerged: fp32 round-off


def test_an_interrupted_run_resumes_bit_for_bit(prefs, tmp_path):
    """SIGINT during step 2 -> checkpoint-000002; the resumed run's metrics (eval too) are the straight run's.
    LoRA dropout makes the RNG state part of it; the resumed run starts from another head and LoRA init
    (seed 9): everything trained comes back from the checkpoint."""
    _, path, pairs = prefs
    config = RMConfig(lr=1e-2, max_steps=4, batch_size=2, save_every=0, eval_every=2)

    def model(seed=1):
        rm = new_rm(path, seed=seed)
        torch.manual_seed(seed)
        return apply_method(rm, "lora", r=2, dropout=0.1)

    margins = [float(i % 3) for i in range(len(pairs))]
    run = dict(eval_pairs=pairs[:4], margins=margins, eval_margins=margins[:4])
    straight = train_rm(model(), pairs, config, tmp_path / "straight", **run)

    def ctrl_c(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(Interrupted, match="interrupted at step 2 of 4"):
        train_rm(model(), pairs, config, tmp_path / "cut", on_step=ctrl_c, **run)
    resumed = train_rm(model(seed=9), pairs, config, tmp_path / "cut", resume=True, **run)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert drop(resumed) == drop(straight) and len(straight) == 5 and "eval_margin" in straight[2]


@pytest.mark.slow
def test_every_registered_method_attaches_under_the_head(prefs):
    """Modules, kv_prefix and embedding seams alike: the forward gives (B,) rewards and the head learns."""
    _, path, pairs = prefs
    tok = mc.load_tokenizer(path)
    batch = RMTask(pairs[:2], RMConfig(), 0).batch([0, 1])
    for name in REGISTRY:
        rm = new_rm(path)
        apply_method(rm, name, tokenizer=tok, **({"adapter_layers": 1} if name == "llama-adapter" else {}))
        rm.score.weight.requires_grad_(True)
        loss, _ = RMLoss(rm, RMConfig())(**batch)
        loss.backward()
        trained = [p for p in rm.parameters() if p.requires_grad and p is not rm.score.weight]
        assert torch.isfinite(loss) and rm.score.weight.grad is not None, name
        assert trained and any(p.grad is not None for p in trained), name


# -- the command ----------------------------------------------------------------------------------------

def rm_command(*argv):
    parser = argparse.ArgumentParser()
    add_train_rm(parser.add_subparsers(dest="kind"))
    return parser.parse_args(["rm", *map(str, argv)])


def test_the_command_writes_a_merged_reward_model(prefs, tmp_path):
    root, path, pairs = prefs
    out = tmp_path / "rm"
    args = rm_command("--model", path, "--data", root / "rm_prefs.jsonl", "--eval-data", root / "rm_prefs.jsonl",
                      "--out", out, "--max-steps", "2", "--r", "2", "--max-length", "64",
                      "--center-rewards-coefficient", "0.01")
    cmd_train_rm(args)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    assert (out / "tokenizer.json").is_file() and (out / "checkpoints" / "latest").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval_accuracy" in rows[-1]
    record = json.loads((out / "train_config.json").read_text())
    assert record["method"] == "lora" and record["center_rewards_coefficient"] == 0.01
    load_reward_model(out)

    with pytest.raises(ValueError, match="--method prompt: its adapters cannot be merged"):
        cmd_train_rm(rm_command("--model", path, "--data", root / "rm_prefs.jsonl", "--out", tmp_path / "p",
                                "--method", "prompt"))
    assert not (tmp_path / "p").exists()


def test_a_qlora_reward_model_is_written_merged_in_full_precision(tmp_path):
    """QLoRA's 4-bit base (the head stays out of it) takes the adapter as dq(W4) + s B A: a plain folder."""
    path, _ = make_checkpoint(tmp_path / "lm", "llama3")
    rm = new_rm(path)
    apply_method(rm, "qlora", r=2)
    assert type(rm.score.weight) is torch.nn.Parameter and rm.score.weight.dtype == torch.float32
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # off the identity, so that a dropped adapter shows
        before = rm(IDS, MASK)
    save_reward_model(rm, tmp_path / "rm")
    assert "quantization_config" not in json.loads((tmp_path / "rm" / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(load_reward_model(tmp_path / "rm")(IDS, MASK), before, rtol=1e-5, atol=1e-5)
