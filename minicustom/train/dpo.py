"""Direct Preference Optimization and its family, with the reference policy chosen explicitly.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model".
For a prompt x with a chosen completion y_w and a rejected one y_l, the policy pi_theta is trained to
raise the implicit reward r(x, y) = beta (log pi_theta(y | x) - log pi_ref(y | x)) of y_w over y_l:

    h = (log pi_theta(y_w|x) - log pi_ref(y_w|x)) - (log pi_theta(y_l|x) - log pi_ref(y_l|x))
    L_DPO = -log sigma(beta h)                       (and the other losses of losses.preference_loss)

log pi(y|x) is summed over the completion's tokens (losses.sequence_logps); a batch of B pairs is one
forward over 2B rows, the chosen rows first. pi_ref stays fixed during training, and which model it is
is the run's most consequential choice, so it is always named, never guessed:

    "base"       the policy with its adapters disabled: the base model, at no memory cost
    "snapshot"   a frozen copy of the trainable tensors as they are when training starts (DPO after an
                 SFT adapter: the reference is the SFT model, not the base underneath it)
    a folder     a separate model loaded from that checkpoint (or a Transformer passed in)
    "precomputed" the starting policy's log-probs, computed once before training and cached on disk
                 under a key of the model's, the trainable tensors' and the data's hashes
Metrics per step: the loss, the rewards of chosen and rejected and their margin and accuracy, and the
policy's and the reference's log-probs of each side, so a falling chosen reward shows whether the
policy lost probability on y_w or the reference simply rated it higher.

Left out (and where to find it): TRL's f-divergence variants, LD-DPO and WPO weighting, TR-DPO's
reference syncing, padding-free batches, KTO and other unpaired-data trainers.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..data import PreferencePair, collate
from ..files import atomic_write
from ..losses import LOSS_TYPES, REFERENCE_FREE, preference_loss, sequence_logps
from ..methods import adapter_layers, disable_adapters
from ..model import eval_mode
from ..progress import Progress
from .loop import TrainConfig, run
from .state import examples_digest

# The losses whose label_smoothing is the probability that a pair's labels are flipped.
FLIP_RATE_LOSSES = {"sigmoid", "robust", "aot", "aot_unpaired", "simpo"}


@dataclass
class DPOConfig(TrainConfig):
    """TrainConfig plus the preference loss (see losses.preference_loss). batch_size counts pairs."""

    lr: float = 5e-5  # for adapters; full fine-tuning wants far less (TRL's default is 1e-6)
    # Pairs are never packed: TrainConfig's switch is off, and left out of the run record (repr=False).
    packing: bool = field(default=False, repr=False)
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    loss_options: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        super().__post_init__()
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if unknown := [t for t in types if t not in LOSS_TYPES]:
            raise ValueError(f"unknown loss type {unknown}; choose from {', '.join(LOSS_TYPES)}")
        # A flip rate (cDPO, robust, AOT, SimPO): 0.5 makes chosen and rejected alike. exo_pair's ε is another
        # quantity, in (0, 1) (preference_loss checks it), allowed past 0.5 when no flip-rate loss shares it.
        upper = 1 if "exo_pair" in types and not set(types) & FLIP_RATE_LOSSES else 0.5
        if not 0 <= self.label_smoothing < upper:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, {upper}) for {'+'.join(types)}, got "
                             f"{self.label_smoothing!r}")
        self.loss_options = dict(loss_type=self.loss_type, beta=self.beta, label_smoothing=self.label_smoothing,
                                 loss_weights=self.loss_weights, rpo_alpha=self.rpo_alpha,
                                 simpo_gamma=self.simpo_gamma, discopop_tau=self.discopop_tau)
        x = torch.full((1,), -1.0)  # one made-up pair: the loss's own checks (beta, weights, ...) now, not at step 1
        preference_loss(x, x, x, x, chosen_lengths=-x, rejected_lengths=-x, **self.loss_options)

    @property
    def reference_free(self) -> bool:
        types = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        return all(t in REFERENCE_FREE for t in types)


# -- the reference policy -----------------------------------------------------------------------------

@torch.no_grad()
def _logps(model: nn.Module, input_ids, labels, attention_mask, chunk: int) -> torch.Tensor:
    """Sequence log-probs of the rows, in eval mode (no dropout) and without a graph."""
    with eval_mode(model):
        h = model.forward_hidden(input_ids, attention_mask=attention_mask)  # (2B, T, C)
        return sequence_logps(h, labels, model.head(), chunk)[0]


class BaseReference:
    """pi_ref = the policy with every adapter switched off: exactly the base model, no second copy."""

    name = "base"

    def __init__(self, model: nn.Module):
        if not adapter_layers(model):
            raise ValueError("reference 'base' disables the policy's adapters, but this model has none (full "
                             "fine-tuning): name a reference model folder, 'snapshot' or 'precomputed'")

    @contextlib.contextmanager
    def scope(self, model):
        """The reference as a model to run (the RL trainers take per-token log-probs from it)."""
        with disable_adapters(model):
            yield model

    def __call__(self, model, input_ids, labels, attention_mask, chunk):
        with self.scope(model) as m:
            return _logps(m, input_ids, labels, attention_mask, chunk)


class SnapshotReference:
    """pi_ref = the policy as it was when training started: a frozen copy of its trainable tensors,
    swapped in (by reference, no copy) for the reference forward and swapped back before the policy's."""

    name = "snapshot"

    def __init__(self, model: nn.Module):
        import torch.distributed as dist

        if dist.is_initialized() and all(p.requires_grad for p in model.parameters()):
            raise ValueError("reference 'snapshot' swaps whole tensors, which FSDP2 shards under full fine-tuning: "
                             "name the starting model's folder, or 'precomputed'")
        self.tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def swapped(self, model):
        params = dict(model.named_parameters())
        live = {n: params[n].data for n in self.tensors}
        for n, t in self.tensors.items():
            params[n].data = t
        try:
            yield
        finally:
            for n, t in live.items():
                params[n].data = t

    @contextlib.contextmanager
    def scope(self, model):
        with self.swapped(model):
            yield model

    def __call__(self, model, input_ids, labels, attention_mask, chunk):
        with self.scope(model) as m:
            return _logps(m, input_ids, labels, attention_mask, chunk)


class ModelReference:
    """pi_ref = a separate, frozen model (twice the base's memory; see benchmarks/bench_dpo_memory.py)."""

    name = "model"

    def __init__(self, reference: nn.Module, policy: nn.Module):
        if reference.config.vocab_size != policy.config.vocab_size:
            raise ValueError(f"the reference model's vocabulary ({reference.config.vocab_size}) differs from the "
                             f"policy's ({policy.config.vocab_size}): they must share a tokenizer")
        self.model = reference.requires_grad_(False).eval()

    @contextlib.contextmanager
    def scope(self, model):
        yield self.model

    def __call__(self, model, input_ids, labels, attention_mask, chunk):
        return _logps(self.model, input_ids, labels, attention_mask, chunk)


def _digest(named: dict[str, torch.Tensor]) -> str:
    """blake2b of names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(named):
        t = named[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_key(model: nn.Module) -> dict[str, str]:
    """The hashes of the frozen tensors (the model, and its device type) and of the trainable ones (the
    starting adapter, or the whole model under full fine-tuning)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict(keep_vars=True)
    device = next(model.parameters()).device.type
    return {"model": _digest({n: t for n, t in state.items() if n not in trainable}) + ":" + device,
            "adapter": _digest({n: t for n, t in state.items() if n in trainable})}


def reference_key(model: nn.Module, pairs: list[PreferencePair], weights: dict[str, str] | None = None
                  ) -> dict[str, str]:
    """The hashes a precomputed reference is keyed by: weights_key(model) (pass it when already known:
    hashing the weights reads all of them) and the pairs' ids and labels."""
    data = hashlib.blake2b(digest_size=16)
    for p in pairs:
        for ex in (p.chosen, p.rejected):
            data.update(repr((ex.input_ids, ex.labels)).encode())
    return {**(weights or weights_key(model)), "data": data.hexdigest()}


def precompute_reference(model: nn.Module, pairs: list[PreferencePair], config: TrainConfig, cache_dir,
                         pad_id: int = 0, report=print, weights: dict[str, str] | None = None) -> torch.Tensor:
    """(N, 2) log-probs of chosen and rejected under the model as it is now (the starting policy), read
    from cache_dir/<key>.safetensors when an earlier run computed them, else computed batch by batch
    (config.batch_size pairs, in order) and written there atomically."""
    key = reference_key(model, pairs, weights)
    name = hashlib.blake2b("|".join(key.values()).encode(), digest_size=12).hexdigest()
    path = Path(cache_dir) / f"{name}.safetensors"
    if path.is_file():
        try:
            with safe_open(path, "pt") as f:
                logps = f.get_tensor("logps")
            if logps.shape == (len(pairs), 2):
                report(f"reference log-probs: {path} (cached)")
                return logps
        except Exception as e:  # a damaged cache is recomputed, not trusted
            report(f"reference log-probs: {path} is unreadable ({e}); computing them again")
    logps = reference_table(lambda *batch: _logps(model, *batch, config.loss_chunk), model, pairs,
                            config.batch_size, pad_id, progress=report is print)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file({"logps": logps}, p, metadata={**key, "pairs": str(len(pairs))}))
    report(f"reference log-probs: {path}")
    return logps


def reference_table(logps_of, model: nn.Module, pairs: list[PreferencePair], batch_size: int, pad_id: int,
                    progress: bool = False) -> torch.Tensor:
    """(N, 2) log-probs of chosen and rejected, logps_of(input_ids, labels, attention_mask) run over
    batches of batch_size pairs in order (the batches evaluation makes, so a live reference's eval
    log-probs computed here once are those it would compute at every evaluation)."""
    logps = torch.empty(len(pairs), 2)
    device = next(model.parameters()).device
    bar = Progress(-(-len(pairs) // batch_size), 0, enabled=progress)
    for i in range(0, len(pairs), batch_size):
        part = pairs[i:i + batch_size]
        batch = {k: v.to(device) for k, v in pair_batch(part, pad_id).items()}
        out = logps_of(batch["input_ids"], batch["labels"], batch.get("attention_mask")).cpu()
        logps[i:i + len(part), 0], logps[i:i + len(part), 1] = out[:len(part)], out[len(part):]
        bar.update(i // batch_size + 1, "reference log-probs")
    bar.close()
    return logps


# -- the loss module and the task ---------------------------------------------------------------------

def pair_batch(pairs: list[PreferencePair], pad_id: int) -> dict:
    """B pairs -> 2B right-padded rows, the chosen completions first, then the rejected ones."""
    return collate([[p.chosen] for p in pairs] + [[p.rejected] for p in pairs], pad_id)


class DPOLoss(nn.Module):
    """Policy forward over the 2B rows, reference log-probs (given, or computed first: a snapshot swaps
    the policy's tensors, which must be back before the policy's graph is built), the preference loss
    summed over the real pairs, and the metrics' sums."""

    def __init__(self, model: nn.Module, reference, config: DPOConfig):
        super().__init__()
        self.model, self.reference, self.config = model, reference, config

    def forward(self, input_ids, labels, pair_mask, attention_mask=None, ref_logps=None):
        chunk = self.config.loss_chunk
        if ref_logps is None and not self.config.reference_free:
            ref_logps = self.reference(self.model, input_ids, labels, attention_mask, chunk)  # (2B,)
        h = self.model.forward_hidden(input_ids, attention_mask=attention_mask)  # (2B, T, C)
        logps, lengths = sequence_logps(h, labels, self.model.head(), chunk)  # (2B,), (2B,)
        B = pair_mask.shape[0]
        ref = ref_logps if ref_logps is not None else torch.zeros_like(logps)
        out = preference_loss(logps[:B], logps[B:], ref[:B], ref[B:], chosen_lengths=lengths[:B],
                              rejected_lengths=lengths[B:], **self.config.loss_options)
        m = pair_mask.to(out.losses.dtype)
        c, r = out.chosen_rewards, out.rejected_rewards
        stats = {"rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
                 "rewards/accuracies": (c > r).float(), "logps/chosen": logps[:B], "logps/rejected": logps[B:],
                 "ref_logps/chosen": ref[:B], "ref_logps/rejected": ref[B:],
                 "policy_accuracy": (logps[:B] > logps[B:]).float()}
        return (out.losses * m).sum(), {k: (v.detach().float() * m).sum() for k, v in stats.items()}


class DPOTask:
    """DPO as the training loop (loop.run) sees it, the `Task` protocol (task.py): a row unit is one pair, the weight of a batch is its
    number of pairs (the loss is the mean over the pairs of the global batch)."""

    weight_name = "pairs"

    def __init__(self, pairs: list[PreferencePair], config: DPOConfig, reference, pad_id: int = 0,
                 eval_pairs: list[PreferencePair] | None = None, ref_logps=None, eval_ref_logps=None):
        self.pairs, self.config, self.reference, self.pad_id = pairs, config, reference, pad_id
        self.eval_pairs = eval_pairs or []
        self.ref_logps, self.eval_ref_logps = ref_logps, eval_ref_logps
        self.units = [[i] for i in range(len(pairs))]
        self.eval_items = list(range(len(self.eval_pairs)))

    def _batch(self, pairs, indices, ref_logps, filler):
        batch = pair_batch([pairs[i] for i in indices], self.pad_id)
        batch["pair_mask"] = torch.full((len(indices),), 0 if filler else 1, dtype=torch.long)
        if ref_logps is not None:
            ref = ref_logps[indices]  # (B, 2)
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])  # (2B,) in the rows' order
        return batch

    def batch(self, unit_ids: list[int], filler: bool = False) -> dict:
        return self._batch(self.pairs, [self.units[u][0] for u in unit_ids], self.ref_logps, filler)

    def eval_batch(self, indices: list[int], filler: bool = False) -> dict:
        return self._batch(self.eval_pairs, indices, self.eval_ref_logps, filler)

    @staticmethod
    def weight(batch: dict) -> int:
        return int(batch["pair_mask"].sum())

    def loss_module(self, model: nn.Module) -> nn.Module:
        return DPOLoss(model, self.reference, self.config)

    def data_digest(self) -> str:
        return examples_digest(e for p in self.pairs for e in (p.chosen, p.rejected))

    def eval_metrics(self, loss_sum: float, weight: int, stats: dict) -> dict:
        n = max(weight, 1)
        return {"eval_loss": loss_sum / n, **{f"eval_{k}": v / n for k, v in stats.items()}}

    def answer_metrics(self, model) -> dict:
        return {}


def make_reference(model: nn.Module, reference, dtype=None, device=None):
    """'base' | 'snapshot' | a checkpoint folder | a Transformer -> the live reference object."""
    if isinstance(reference, nn.Module):
        return ModelReference(reference, model)
    if reference == "base":
        return BaseReference(model)
    if reference == "snapshot":
        return SnapshotReference(model)
    if isinstance(reference, (str, Path)) and Path(reference).is_dir():
        from ..checkpoint import load_model

        p = next(model.parameters())
        return ModelReference(load_model(reference, dtype=dtype or p.dtype, device=device or p.device), model)
    raise ValueError(f"reference must be 'base', 'snapshot', 'precomputed', a checkpoint folder or a model; "
                     f"got {reference!r}" + (" (no such folder)" if isinstance(reference, (str, Path)) else ""))


def train_dpo(model: nn.Module, pairs: list[PreferencePair], config: DPOConfig, out, *, reference=None,
              eval_pairs: list[PreferencePair] | None = None, pad_id: int = 0, resume: bool = False,
              reference_cache=None, on_step=None, report=print, data_files=None, options=None) -> list[dict]:
    """Train the parameters of `model` that require grad on preference pairs; returns the logged metrics.

    `reference` must be named: 'base', 'snapshot', 'precomputed', a checkpoint folder or a model (see the
    module docstring); only reference-free losses (simpo, orpo) go without. 'precomputed' caches under
    reference_cache (default out/reference-logps). Outputs, checkpoints, resume (and data_files and
    options) are those of sft.train."""
    if config.reference_free:
        live, ref, eval_ref = None, None, None
    elif reference is None:
        raise ValueError(f"loss {config.loss_type!r} compares the policy with a reference policy: pass reference="
                         "'base' (adapters disabled), 'snapshot' (the starting trainable tensors, frozen), "
                         "'precomputed', a checkpoint folder or a model")
    elif isinstance(reference, str) and reference == "precomputed":
        cache = Path(reference_cache) if reference_cache else Path(out) / "reference-logps"
        live = None
        weights = weights_key(model)  # once for both sets: it reads every weight
        ref = precompute_reference(model, pairs, config, cache, pad_id, report, weights)
        eval_ref = (precompute_reference(model, eval_pairs, config, cache, pad_id, report, weights)
                    if eval_pairs else None)
    else:  # the reference is fixed: its eval log-probs are computed once, not at every evaluation
        live, ref = make_reference(model, reference), None
        eval_ref = reference_table(lambda *batch: live(model, *batch, config.loss_chunk), model, eval_pairs,
                                   config.batch_size, pad_id) if eval_pairs else None
    task = DPOTask(pairs, config, live, pad_id, eval_pairs, ref, eval_ref)
    return run(task, model, out, resume=resume, on_step=on_step, data_files=data_files, options=options)
