"""New tokens: added to the tokenizer and to the model's vocabulary, as transformers users do it with
`tokenizer.add_tokens(tokens)` and `model.resize_token_embeddings(len(tokenizer))`, and saved so that
transformers loads the extended model and tokenizer.

Normal or special: by default the tokens are normal added tokens (transformers' add_tokens): never split,
and kept when text is decoded with skip_special_tokens=True, which is what chat, serve and generate do, so
markup such as "<think>" or "<tool>" stays visible in answers. special=True adds them as transformers'
add_special_tokens / add_tokens(special_tokens=True) does (matched as typed, dropped by skip_special_tokens;
listed in tokenizer_config.json's extra_special_tokens): for control tokens that must not show.

The new rows are transformers 5's resize_token_embeddings default (mean_resizing=True), draw for draw: a
fresh nn.Embedding(V', C) is built (its own normal init draws, as transformers builds it), its added rows
are sampled from N(μ, 1e-9 Σ), the mean and covariance of the old rows in fp32 (the mean itself when 1e-9 Σ
is not positive definite), and the old rows copied in; an untied lm_head gets the same from its own rows
(after a fresh nn.Linear's init draws), a tied one shares the embedding. So a torch seed gives transformers'
rows exactly. The vocabulary only grows: ids that fall in rows the model already has (vocabularies padded
past the tokenizer) keep those rows, where transformers' resize to len(tokenizer) would cut them off.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributions import constraints

from .checkpoint import save_model
from .files import atomic_write
from .model import Transformer

__all__ = ["add_tokens", "check_new_tokens", "resize_token_embeddings", "save_extended_base"]


def check_new_tokens(tokenizer, tokens, model: nn.Module | None = None) -> None:
    """One-line errors, before anything changes: no tokenizer, not a list of strings, an empty token, a token
    given twice, one already in the vocabulary (named), or a model whose embedding carries an adapter."""
    if tokenizer is None:
        raise ValueError("new tokens need the tokenizer, to add them to (pass tokenizer=)")
    if isinstance(tokens, str) or not isinstance(tokens, (list, tuple)) or not tokens:
        raise ValueError(f"new tokens must be a non-empty list of strings, found {tokens!r}")
    for t in tokens:
        if not isinstance(t, str):
            raise ValueError(f"new tokens must be strings, found {t!r}")
        if not t.strip():
            raise ValueError(f"a new token is empty or blank ({t!r}); check the commas in the list")
    if twice := next((t for t in tokens if tokens.count(t) > 1), None):
        raise ValueError(f"new token {twice!r} is given twice")
    if known := next((t for t in tokens if tokenizer.token_to_id(t) is not None), None):
        raise ValueError(f"new token {known!r} is already in the vocabulary (id {tokenizer.token_to_id(known)}); "
                         "train its row with token_indices instead")
    if model is not None and type(model.model.embed_tokens) is not nn.Embedding:
        raise ValueError(f"the embedding carries an adapter ({type(model.model.embed_tokens).__name__}); add tokens "
                         "before attaching adapters")


def add_tokens(model: Transformer, tokenizer, tokens: list[str], special: bool = False) -> list[int]:
    """Add `tokens` to `tokenizer` (normal added tokens, or special ones) and grow the model's embedding (and an
    untied lm_head) to cover their ids, the new rows initialised as transformers' resize_token_embeddings does.
    Returns the new ids. Checked first: nothing changes on an error."""
    check_new_tokens(tokenizer, tokens, model)
    ids = tokenizer.add_tokens(list(tokens), special=special)
    if (need := max(ids) + 1) > model.config.vocab_size:
        resize_token_embeddings(model, need)
    return ids


def _mean_init(old: torch.Tensor, new: torch.Tensor, added: int):
    """transformers' _init_added_embeddings_weights_with_mean: new[-added:] ~ N(μ, 1e-9 Σ) of old's rows."""
    w = old.to(torch.float32)  # (V, C)
    mean = w.mean(0)  # (C,)
    centered = w - mean
    covariance = centered.T @ centered / w.shape[0]  # (C, V) @ (V, C) -> (C, C)
    if constraints.positive_definite.check(1e-9 * covariance).all():
        dist = torch.distributions.multivariate_normal.MultivariateNormal(mean, covariance_matrix=1e-9 * covariance)
        new[-added:] = dist.sample(sample_shape=(added,)).to(old.dtype)  # (added, C)
    else:
        new[-added:] = mean[None, :].repeat(added, 1).to(old.dtype)


@torch.no_grad()
def resize_token_embeddings(model: Transformer, n: int):
    """Grow the vocabulary to n rows (transformers' resize_token_embeddings(n), mean_resizing=True); the
    embedding keeps its Parameter (its data replaced, as transformers does), so a tied lm_head follows."""
    embed, head = model.model.embed_tokens, model.lm_head
    V, C = embed.weight.shape
    if n <= V:
        raise ValueError(f"the vocabulary has {V} rows already; it only grows (asked for {n})")
    w = embed.weight
    fresh = nn.Embedding(n, C, device=w.device, dtype=w.dtype)  # its init draws, as transformers builds it
    _mean_init(w.data, fresh.weight.data, n - V)
    fresh.weight.data[:V] = w.data
    embed.weight.data, embed.num_embeddings = fresh.weight.data, n
    if model.config.tie_word_embeddings:
        head.weight = embed.weight
    else:
        lw = head.weight
        new_head = nn.Linear(C, n, bias=False, device=lw.device, dtype=lw.dtype)
        _mean_init(lw.data, new_head.weight.data, n - V)
        new_head.weight.data[:V] = lw.data
        new_head.weight.requires_grad_(lw.requires_grad)
        model.lm_head = new_head
    head = model.lm_head
    head.out_features = n
    model.config.vocab_size = n


def save_extended_base(model: Transformer, tokenizer, path, source=None) -> Path:
    """Write the model's base weights (the adapter's tensors left out) as a checkpoint folder, the extended
    tokenizer beside them, and `source`'s generation_config.json: what AutoModelForCausalLM and AutoTokenizer
    load, and what the adapter's base_model_name_or_path names."""
    with torch.device("meta"):
        keys = set(Transformer(model.config).state_dict())  # the plain model's names: no adapter tensor
    state = {k: v for k, v in model.state_dict().items() if k in keys}
    if missing := sorted(keys - set(state) - {"lm_head.weight"}):
        raise ValueError(f"cannot save the base: the model lacks {missing[:3]} (an adapter moved them?)")
    save_model(model, path, state=state)
    tokenizer.save(path)
    generation = Path(source or "") / "generation_config.json"
    if source is not None and generation.is_file():
        atomic_write(Path(path) / generation.name, lambda tmp: tmp.write_bytes(generation.read_bytes()))
    return Path(path)
