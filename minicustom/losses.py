"""Losses: chunked cross-entropy for SFT, computed only where labels are trained.

Next-token loss over a batch: position t predicts labels[t + 1], and only positions whose target is not
-100 count. Instead of the (B, T, V) logits of the usual `lm_head(h)` + `cross_entropy` (for
SmolLM2 at 4 x 256 tokens that is 200 MB, and the softmax and its gradient as much again), the hidden
states of the N trained positions are gathered and the loss is computed N_c rows at a time:

    z = h_c W^T                          (N_c, V) logits of one chunk
    loss_c = sum(logsumexp(z) - z[y])    summed, never averaged here
    dz = softmax(z) - onehot(y)          d loss_c / d z
    dh_c = dz W,  dW += dz^T h_c         the gradients, made in the same pass

The gradients are built in the forward pass and scaled by the incoming gradient in backward (the
"fused linear cross-entropy" of Liger-Kernel), so the peak is one (N_c, V) chunk. The sum is returned
with the number of trained tokens; the trainer divides by the total over all accumulation
micro-batches and processes, so every trained token weighs the same however the batch is split.
Left out: label smoothing and z-loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) for h (N, C), W (V, C), y (N,), with the gradients made chunk by chunk."""

    @staticmethod
    def forward(ctx, h, W, y, chunk: int):
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_W = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_W else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # one (N_c, V) fp32 buffer for every chunk: a fresh 50 MB tensor per chunk costs page faults on CPU
        z_buf = torch.empty((min(chunk, h.shape[0]), W.shape[0]), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk):
            hc, yc = h[i:i + chunk], y[i:i + chunk]
            z = z_buf[:hc.shape[0]]
            if h.dtype == torch.float32:
                torch.mm(hc, W.T, out=z)  # (N_c, V) logits
            else:
                z.copy_(hc @ W.T)  # half-precision matmul, fp32 softmax
            # log-softmax in place, row by row (each row's max and sum are read before it is written)
            torch.ops.aten._log_softmax.out(z, 1, False, out=z)
            total -= z.gather(1, yc[:, None]).sum()  # - log p(y)
            if need_h or need_W:
                dz = z.exp_()  # softmax
                dz[torch.arange(len(yc), device=dz.device), yc] -= 1.0  # d loss / d z = p - onehot(y)
                dz = dz.to(h.dtype)
                if need_h:
                    torch.mm(dz, W, out=grad_h[i:i + chunk])  # (N_c, C)
                if need_W:
                    grad_W.addmm_(dz.T.float(), hc.float())  # (V, C)
        ctx.save_for_backward(grad_h, grad_W)
        ctx.W_dtype = W.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_W = ctx.saved_tensors
        return (grad_h * g if grad_h is not None else None,
                (grad_W * g).to(ctx.W_dtype) if grad_W is not None else None, None, None)


def trained_positions(hidden, labels):
    """Hidden states (N, C) of the positions whose next token is trained, and those targets (N,)."""
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


def sft_loss(hidden, labels, lm_head: nn.Module, chunk: int = 512):
    """(sum of next-token cross-entropy over trained positions, number of trained positions).

    hidden (B, T, C) are the final-norm hidden states, labels (B, T) the ids with -100 where not trained.
    A plain bias-free Linear head takes the fused chunked path above; any other head (a LoRA-wrapped
    lm_head, say) is run chunk by chunk under activation checkpointing, which recomputes each chunk's
    logits in backward instead of keeping them."""
    h, y = trained_positions(hidden, labels)
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0, 0
    if type(lm_head) is nn.Linear and lm_head.bias is None:
        return LinearCrossEntropy.apply(h, lm_head.weight, y, chunk), n
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, lm_head, h[i:i + chunk], y[i:i + chunk],
                                                          use_reentrant=False)
    return total, n


def _chunk_loss(lm_head, h, y):
    return F.cross_entropy(lm_head(h).float(), y, reduction="sum")
