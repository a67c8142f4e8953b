"""A reward model: the decoder with a scalar head in place of the language-model head.

Stiennon et al. 2020, "Learning to summarize from human feedback"; Ouyang et al. 2022, "Training language
models to follow instructions with human feedback" (InstructGPT). A reward model r_theta(x, y) scores a
whole sequence with one number, trained on pairs where people preferred y_w to y_l under the
Bradley–Terry model of preferences:

    P(y_w > y_l | x) = sigma(r_theta(x, y_w) - r_theta(x, y_l))
    L = -log sigma(r_theta(x, y_w) - r_theta(x, y_l))                    (losses.reward_loss; train/rm.py)

The score is a linear map of the final-norm hidden state of the sequence's last token, the layout of
transformers' *ForSequenceClassification with num_labels 1 (`score.weight` (1, C), no bias, no lm_head),
so a folder saved here is one that AutoModelForSequenceClassification, TRL's RewardTrainer and PPO
trainers read, and the other way round. `RewardModel` is a `Transformer`, so every registered method
attaches to it unchanged (modules, kv_prefix, inputs_embeds); the head is deliberately not an nn.Linear:
"all-linear" targets and QLoRA's quantization take every nn.Linear but lm_head, and the head must stay a
full-precision matrix trained whole, as PEFT keeps a SEQ_CLS model's head (modules_to_save).

Which token is "last" is transformers' rule, copied exactly (GenericForSequenceClassification): the
rightmost position whose token is not config.pad_token_id, here also required to be inside the attention
mask, so that rows padded with some other id are still read at their last real token. The trap: a
sequence that *ends* in the pad token (SmolLM2's pad token is its EOS, <|im_end|>) is read at the token
before its trailing pad tokens, in training and in use alike, by transformers as here; a row of nothing
but pad tokens is read at position 0.
Left out: num_labels > 1 classifiers, a value head (PPO's critic is train/ppo.py's), reward ensembles.

Dimensions: B batch, T tokens, C hidden.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, load_model, save_model
from .config import ModelConfig
from .files import read_json
from .methods import adapter_layers, merge_adapter
from .methods.qlora import merge_4bit
from .model import Transformer
from .quant.linear4bit import Linear4bit

ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
                 "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification"}
INIT_STD = 0.02  # transformers' initializer_range, with which it draws a new score head


class RewardModelError(CheckpointError):
    """A folder that is not a reward model, or a reward model that does not fit its use."""


class ScoreHead(nn.Module):
    """score(h) = h w^T, w (1, C): nn.Linear(C, 1, bias=False)'s math and key (`score.weight`), but not an
    nn.Linear, so that "all-linear" adapters and quantization leave it whole (see the module docstring)."""

    def __init__(self, hidden_size: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=INIT_STD)

    def forward(self, h):
        return h @ self.weight.T  # (..., C) -> (..., 1)


def last_token_positions(input_ids, pad_token_id: int | None, attention_mask=None):
    """(B,) the position each row is scored at: the rightmost token != pad_token_id (transformers' rule)
    that the attention mask keeps; with neither a pad id nor a mask, the last position."""
    B, T = input_ids.shape
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    if pad_token_id is not None:
        keep &= input_ids != pad_token_id
    if attention_mask is not None:
        keep &= attention_mask.bool()
    idx = torch.arange(T, device=input_ids.device, dtype=torch.int32)  # (T,)
    return (idx * keep.to(torch.int32)).argmax(-1)  # (B,): ties (all padding) -> 0, as transformers


class RewardModel(Transformer):
    """The decoder and a scalar head: forward(input_ids, attention_mask) -> (B,) rewards, float32."""

    head_key = "score.weight"  # checkpoint.load_model refuses a folder without it, by name

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.lm_head = None  # an untied model's (V, C) matrix would be kept for nothing
        self.score = ScoreHead(config.hidden_size)

    @classmethod
    def from_causal_lm(cls, lm: Transformer, pad_token_id: int | None = None) -> RewardModel:
        """A reward model made of `lm`'s decoder (shared, not copied; its adapters come along) and a new head
        drawn from N(0, 0.02^2) with torch's global generator, as transformers draws it. pad_token_id
        replaces the config's (the tokenizer's pad id when the config names none)."""
        pad = lm.config.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None or pad < 0:
            raise RewardModelError("a reward model needs a pad token id (it scores the last token that is not "
                                   "padding), and the model's config names none: pass pad_token_id")
        if pad >= lm.config.vocab_size:
            raise RewardModelError(f"pad_token_id {pad} is outside the model's vocabulary of {lm.config.vocab_size}")
        config = dataclasses.replace(lm.config, pad_token_id=pad)
        with torch.device("meta"):
            rm = cls(config)
        w = lm.model.embed_tokens.weight
        rm.model, rm.rope, rm.kv_prefix = lm.model, lm.rope, lm.kv_prefix
        rm.adapter_configs = lm.adapter_configs
        rm.model.embed_tokens.padding_idx = pad  # as transformers builds the embedding: no gradient to that row
        rm.score = ScoreHead(config.hidden_size, device=w.device, dtype=w.dtype)
        rm.gradient_checkpointing = lm.gradient_checkpointing
        return rm.train(lm.training)

    def tie_weights(self):
        pass  # no lm_head to tie

    def forward(self, input_ids, attention_mask=None):
        """Rewards (B,) of the rows of input_ids (B, T), each read at `last_token_positions`."""
        h = self.forward_hidden(input_ids, attention_mask=attention_mask)  # (B, T, C)
        last = last_token_positions(input_ids, self.config.pad_token_id, attention_mask)  # (B,)
        pooled = h[torch.arange(h.shape[0], device=h.device), last]  # (B, C)
        return self.score(pooled).squeeze(-1).float()  # (B,)

    def generate(self, *args, **kwargs):
        raise TypeError("a reward model scores sequences; it has no language-model head to generate with")


def reward_config_fields(config: ModelConfig) -> dict:
    """What config.json says beyond the decoder's fields: the class transformers builds and its one label."""
    return {"architectures": [ARCHITECTURES[config.model_type]], "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0}, "pad_token_id": config.pad_token_id}


def save_reward_model(model: RewardModel, folder, max_shard_size: int = 4 << 30, dtype: torch.dtype | None = None):
    """Write `model` as a transformers sequence-classification folder (num_labels 1), atomically as
    checkpoint.save_model writes. Adapters are merged in place first (LoRA on a 4-bit base into full
    precision, qlora.merge_4bit); a method with nothing to merge (prefixes, bottleneck adapters) is refused
    before anything changes."""
    if not isinstance(model, RewardModel):
        raise TypeError(f"save_reward_model takes a RewardModel, got {type(model).__name__}")
    if model.config.pad_token_id is None or model.config.pad_token_id < 0:
        raise RewardModelError(f"{folder}: the model's config has no pad_token_id, which transformers needs to "
                               "score a batch (the last token that is not padding)")
    layers = adapter_layers(model)
    if unmergeable := sorted({type(layer).__name__ for _, layer in layers if not layer.mergeable}):
        raise RewardModelError(f"{folder}: the model carries adapters that cannot be merged into its weights "
                               f"({', '.join(unmergeable)}); a reward model folder holds plain weights only")
    if any(isinstance(m, Linear4bit) for _, layer in layers for m in layer.modules()):
        merge_4bit(model)
    if adapter_layers(model):
        merge_adapter(model)
    return save_model(model, folder, max_shard_size, dtype, config_fields=reward_config_fields(model.config))


def check_reward_config(folder) -> dict:
    """The config.json of a reward-model folder, refused in one line (file and field) when it describes
    anything else: a causal LM, a classifier of several labels, no pad token."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json (expected a Hugging Face checkpoint folder)")
    raw = read_json(file, RewardModelError)
    if not isinstance(raw, dict):
        raise RewardModelError(f"{file}: expected a JSON object")
    arch = raw.get("architectures")
    if not (isinstance(arch, list) and any(isinstance(a, str) and a.endswith("ForSequenceClassification")
                                           for a in arch)):
        lm = isinstance(arch, list) and any(isinstance(a, str) and a.endswith("ForCausalLM") for a in arch)
        raise RewardModelError(f"{file}: field 'architectures' is {arch!r}" + (", a causal language model" if lm
                               else "") + "; a reward model is a *ForSequenceClassification with num_labels 1 "
                               "(train one from this folder with `minicustom train rm --model`)")
    labels = raw.get("id2label")
    n = len(labels) if isinstance(labels, dict) else raw.get("num_labels", 2)  # transformers' default: 2
    if n != 1:
        field = "id2label" if isinstance(labels, dict) else "num_labels"
        raise RewardModelError(f"{file}: field '{field}' gives {n!r} labels; a reward model has one "
                               "(num_labels 1): this is a classifier, not a reward model")
    pad = raw.get("pad_token_id")
    if not (isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0):
        raise RewardModelError(f"{file}: field 'pad_token_id' is {pad!r}; a reward model needs a token id there "
                               "(it scores the last token that is not padding; transformers refuses batches "
                               "without one)")
    return raw


def load_reward_model(path, dtype: torch.dtype = torch.float32, device="cpu", quantize: str | None = None
                      ) -> RewardModel:
    """Read a sequence-classification folder with one label (saved here or by transformers) into a
    RewardModel, every tensor checked as checkpoint.load_model checks a causal LM's."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint folder")
    check_reward_config(path)
    return load_model(path, dtype=dtype, device=device, quantize=quantize, model_class=RewardModel)


def _vocab(tokenizer) -> dict[str, int]:
    """token -> id of a minicustom Tokenizer, a `tokenizers` Tokenizer or a transformers one."""
    backend = getattr(tokenizer, "backend", tokenizer)
    try:
        return backend.get_vocab(with_added_tokens=True)
    except TypeError:  # transformers' get_vocab() takes no argument and includes the added tokens
        return backend.get_vocab()


def check_same_tokenizer(reward_tokenizer, policy_tokenizer, where: str = "the reward model"):
    """Refuse a reward model whose tokenizer maps tokens to ids otherwise than the policy's: an RL run
    hands it the policy's token ids as they are, and a different vocabulary scores other text."""
    rv, pv = _vocab(reward_tokenizer), _vocab(policy_tokenizer)
    if rv == pv:
        return
    differ = sorted(t for t in rv.keys() & pv.keys() if rv[t] != pv[t])
    only = sorted(rv.keys() ^ pv.keys())
    shown = [f"{t!r} is {rv[t]} there, {pv[t]} in the policy's" for t in differ[:3]] + [
        f"{t!r} is only in {'the reward model' if t in rv else 'the policy'}'s" for t in only[:3]]
    raise RewardModelError(f"{where}: its tokenizer differs from the policy's ({len(rv)} vs {len(pv)} tokens; "
                           f"{len(differ)} with other ids, {len(only)} in one only: {'; '.join(shown)}); the "
                           "reward model scores the policy's token ids as they are, so both need one vocabulary")
