"""Chunked cross-entropy against F.cross_entropy on the full logits, forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minicustom.losses import IGNORE, LinearCrossEntropy, sft_loss


def reference(hidden, labels, head):
    """The textbook loss: full (B, T, V) logits, shift by one, sum over targets that are not -100."""
    logits = head(hidden)[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("B,T,C,V,chunk", [(2, 17, 24, 331, 5), (3, 9, 40, 1000, 256), (1, 41, 8, 97, 7)])
@pytest.mark.parametrize("train_head", [False, True])
def test_matches_full_logits(B, T, C, V, chunk, train_head):
    g = torch.Generator().manual_seed(B * T)
    head = nn.Linear(C, V, bias=False)
    head.weight.requires_grad_(train_head)
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.4] = IGNORE
    ours, n = sft_loss(hidden, labels, head, chunk=chunk)
    assert n == int((labels[:, 1:] != IGNORE).sum())
    ours_grads = torch.autograd.grad(ours * 0.7, [hidden] + ([head.weight] if train_head else []))
    theirs = reference(hidden, labels, head)
    theirs_grads = torch.autograd.grad(theirs * 0.7, [hidden] + ([head.weight] if train_head else []))
    # fp32 sums of the same terms in another order: a few ulps of the total
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_wrapped_head_takes_the_checkpointed_path():
    """A head that is not a plain Linear (here a Linear inside a Sequential) gets the same loss and grads."""
    g = torch.Generator().manual_seed(0)
    head = nn.Sequential(nn.Linear(16, 50, bias=True))
    hidden = torch.randn(2, 11, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 11), generator=g)
    labels[0, :6] = IGNORE
    ours, _ = sft_loss(hidden, labels, head, chunk=4)
    ours.backward()
    ours_grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()
    reference(hidden, labels, head).backward()
    theirs_grads = [hidden.grad] + [p.grad for p in head.parameters()]
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_trained_token_gives_zero_with_a_graph():
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    loss, n = sft_loss(hidden, torch.full((1, 5), IGNORE), nn.Linear(8, 10, bias=False))
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and (hidden.grad == 0).all()


def test_hand_derived_value():
    """Uniform logits (W = 0) over V classes: each trained token costs log V exactly."""
    head = nn.Linear(4, 7, bias=False)
    nn.init.zeros_(head.weight)
    labels = torch.tensor([[IGNORE, 3, IGNORE, 6]])
    loss, n = sft_loss(torch.randn(1, 4, 4), labels, head)
    assert n == 2
    torch.testing.assert_close(loss, torch.tensor(2 * torch.log(torch.tensor(7.0)).item()))


def test_half_precision_keeps_fp32_logits():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(13, 32, generator=g).bfloat16()
    W = torch.randn(300, 32, generator=g).bfloat16()
    y = torch.randint(0, 300, (13,), generator=g)
    ours = LinearCrossEntropy.apply(h, W, y, 4)
    theirs = F.cross_entropy((h @ W.T).float(), y, reduction="sum")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("B,T,C,V,chunk", [(4, 17, 24, 331, 5), (3, 9, 40, 1000, 256), (2, 41, 8, 97, 7)])
def test_sequence_logps_match_full_logits(B, T, C, V, chunk):
    """Per-row sums of log p(y_{t+1}) over the trained targets, forward and backward (hidden and head),
    against log_softmax of the full logits; row 1 has no trained token and sums to exactly 0."""
    from minicustom.losses import sequence_logps

    g = torch.Generator().manual_seed(T)
    head = nn.Linear(C, V, bias=False)
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.4] = IGNORE
    labels[1] = IGNORE
    ours, n = sequence_logps(hidden, labels, head, chunk=chunk)
    targets = labels[:, 1:]
    logp = torch.log_softmax(head(hidden)[:, :-1].float(), -1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    theirs = (logp * (targets != IGNORE)).sum(1)
    assert n.tolist() == (targets != IGNORE).sum(1).tolist() and ours[1] == 0
    weights = torch.randn(B, generator=g)  # each row's own incoming gradient, as a preference loss gives
    ours_grads = torch.autograd.grad((ours * weights).sum(), [hidden, head.weight])
    theirs_grads = torch.autograd.grad((theirs * weights).sum(), [hidden, head.weight])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
