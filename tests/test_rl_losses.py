"""The RLHF-rung losses against TRL 1.16 as oracle: TRL's own trainer methods run on stubs, never its formulas
copied here.

What runs, and on what (line numbers: trl 1.16.0 in the venv's site-packages/trl/trainer/):
- policy_loss: GRPOTrainer._compute_loss on a stub trainer, through TRL's real
  _get_per_token_logps_and_entropies, whose `model` is a stub returning our per-token log-probs (prompt positions
  0). The token loss is grpo_trainer.py:3113-3120 (clip with ε_low, ε_high), + β·k3 at 3100-3101, 3150; the
  aggregations: grpo 3154 (per-row sum / row count clamped at 1, so an empty row adds 0 and still counts in the
  mean), bnpo 3159, dr_grpo 3164 (B · max_completion_length), dapo 3170-3173: num_items_in_batch.clamp(1) /
  num_processes (· accumulation steps / steps_per_generation in train mode), where num_items_in_batch is the
  completion-token count of the whole generation batch, gathered over processes (2497-2498); one process, one
  step, no accumulation: the batch's token count, as test_trl_num_items_in_batch_is_the_token_count checks.
- group_advantages, rloo_advantages: GRPOTrainer / RLOOTrainer._generate_and_score_completions (the smallest
  TRL function that holds them) on a stub whose _generate returns token lists and _calculate_rewards our
  rewards. GRPO grpo_trainer.py:2765-2787: group mean (nanmean), std by trl.trainer.utils.nanstd (unbiased:
  Bessel's count/(count − 1), utils.py:1038-1044), per group or over the batch, A = (r − mean) / (std + 1e-4),
  the 1e-4 outside the std; "none" divides by nothing; "batch" still centres on the group mean. RLOO
  rloo_trainer.py:1686-1690: baseline (Σ_group − r_i) / (G − 1), with normalize_advantages off.
- kto_loss, kto_kl: KTOTrainer._compute_loss with precompute_ref_logps (reference sums given in the batch) and
  a stub model returning per-token log-probs for the batch and for the mismatched KL batch. KL
  kto_trainer.py:1443-1444: mean(KL_logps − ref_KL_logps), detached, clamped at 0; desirable
  1 − σ(β (log-ratio − z0)) at 1453, undesirable 1 − σ(β (z0 − log-ratio)) at 1470, weighted at 1480, the loss
  losses.nanmean() at 1548 (TRL orders the losses chosen first; we compare each example alone, and the batch
  mean). Rewards β · log-ratio at 1459, 1474.
- reward_loss: RewardTrainer.compute_loss (reward_trainer.py:778-795) with a stub model whose logits are the
  chosen then the rejected rewards: mean(−log σ(r_w − r_l [− m])) + c · mean((r_w + r_l)²).

Tolerance: every input is fp64 (TRL allows it throughout these paths); both sides then evaluate the same
expression from bit-identical inputs and differ only in the order of a few fp64 operations on O(1) numbers
(error ~1e-15), so rtol = atol = 1e-9 holds with a wide margin, and any formula difference or a silent cast to
fp32 (~1e-7 relative) fails it. Gradients: autograd on both sides, the same tolerance. One exception, TRL's:
nanstd's Bessel factor count / (count − 1) divides two int64 tensors, which gives fp32 whatever the data's dtype
(utils.py:1041), so TRL's std carries the fp32 rounding of 4/3 or 12/11 (≤ 2^-24 ≈ 6e-8 relative, 3e-8 after
the square root; measured 1.49e-8), while torch.std is fp64 throughout: the scaled advantages get rtol 5e-8.
"""

import collections
import contextlib
import types

import pytest
import torch

from minicustom.losses import (
    group_advantages,
    kto_kl,
    kto_loss,
    policy_loss,
    reward_loss,
    rloo_advantages,
    sequence_policy_loss,
)

TOL = dict(rtol=1e-9, atol=1e-9)
STD_TOL = dict(rtol=5e-8, atol=1e-9)  # TRL's fp32 Bessel factor, see above
DT = torch.float64


def metrics():
    return collections.defaultdict(lambda: collections.defaultdict(list))


def accelerator():
    """A one-process accelerator: gathers and reductions are the identity."""
    return types.SimpleNamespace(device="cpu", process_index=0, num_processes=1, is_main_process=True,
                                 autocast=contextlib.nullcontext,
                                 gather=lambda x: x, gather_for_metrics=lambda x: x,
                                 reduce=lambda x, reduction: x, unwrap_model=lambda m: m)


# -- policy_loss against GRPOTrainer._compute_loss ------------------------------------------------------

def policy_batch(B, T, seed):
    """Per-token log-probs (B, T) of a batch whose ratios straddle both clip edges: log π = log π_old + N(0,
    0.3²). Right-padded masks of random lengths, row 1 empty, row 2 full; padding positions carry nonzero
    garbage (a loss that forgets the mask sees it). Advantages N(0, 1) with two exact zeros."""
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(B, T, generator=g, dtype=DT)
    logps = old + 0.3 * torch.randn(B, T, generator=g, dtype=DT)
    ref = logps + 0.5 * torch.randn(B, T, generator=g, dtype=DT)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1], lengths[2] = 0, T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T)
    advantages = torch.randn(B, generator=g, dtype=DT)
    advantages[0] = advantages[3] = 0.0
    return logps, old, ref, mask, advantages


def trl_grpo_loss(logps, old, ref, mask, advantages, loss_type, eps_low, eps_high, beta, max_len):
    """GRPOTrainer._compute_loss, train mode, one process, no accumulation; `logps` reaches it through TRL's
    _get_per_token_logps_and_entropies from a stub model (P prompt positions of 0 in front)."""
    from trl import GRPOTrainer

    B, T = logps.shape
    P = 3

    def model(input_ids, attention_mask, labels, fused_lm_head):  # the fused LM head's per-position outputs
        assert input_ids.shape == (B, P + T)
        return types.SimpleNamespace(log_probs=torch.cat([logps.new_zeros(B, P), logps], 1),
                                     entropy=logps.new_zeros(B, P + T).detach())

    stub = types.SimpleNamespace(
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_low if eps_high is None else eps_high,
        beta=beta, max_completion_length=max_len, importance_sampling_level="token", top_entropy_quantile=1.0,
        aux_loss_enabled=False, off_policy_mask_threshold=None, use_vllm=False, _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1, model=types.SimpleNamespace(training=True),
        accelerator=accelerator(), _metrics=metrics(),
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    stub._get_per_token_logps_and_entropies = types.MethodType(GRPOTrainer._get_per_token_logps_and_entropies,
                                                              stub)
    inputs = {"prompt_ids": torch.zeros(B, P, dtype=torch.long), "prompt_mask": torch.ones(B, P, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old,
              "num_items_in_batch": mask.sum()}  # what _generate_and_score_completions hands over (2497-2498)
    if beta:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(stub, model, inputs)


@pytest.mark.parametrize("B,T,seed", [(5, 7, 0), (6, 13, 1)], ids=["B5T7", "B6T13"])
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, None), (0.2, 0.28)], ids=["eps0.2", "eps0.2-0.28"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_policy_loss_matches_trl_grpo(loss_type, beta, eps_low, eps_high, B, T, seed):
    logps, old, ref, mask, advantages = policy_batch(B, T, seed)
    max_len = T + 3  # dr_grpo's normalizer is the configured maximum, not the padded width
    theirs_in = logps.clone().requires_grad_()
    theirs = trl_grpo_loss(theirs_in, old, ref, mask, advantages, loss_type, eps_low, eps_high, beta, max_len)
    ours_in = logps.clone().requires_grad_()
    ours = policy_loss(ours_in, old, advantages, mask, loss_type=loss_type, epsilon_low=eps_low,
                       epsilon_high=eps_high, beta=beta, ref_logps=ref if beta else None,
                       max_completion_length=max_len)
    assert ours.shape == () and torch.isfinite(theirs)
    torch.testing.assert_close(ours, theirs, **TOL)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, **TOL)
    assert theirs_in.grad[1].abs().sum() == 0 and theirs_in.grad[2].abs().sum() > 0  # the empty row, a full one


def trl_rloo_loss(logps, old_seq, mask, advantages, eps_low, eps_high):
    """RLOOTrainer._compute_loss (rloo_trainer.py:1794-1833), one process: the per-token log-probs come from a
    stubbed _get_per_token_logps_and_entropies; TRL sums them over the completion mask itself."""
    from trl import RLOOTrainer

    B, T = logps.shape
    stub = types.SimpleNamespace(
        epsilon_low=eps_low, epsilon_high=eps_low if eps_high is None else eps_high, aux_loss_enabled=False,
        model=types.SimpleNamespace(training=True), accelerator=accelerator(), _metrics=metrics(),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_logps": old_seq}
    return RLOOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, None), (0.2, 0.28)], ids=["eps0.2", "eps0.2-0.28"])
def test_sequence_policy_loss_matches_trl_rloo(eps_low, eps_high):
    """RLOO's clipped ratio of whole completions: log π summed over each completion's tokens (padding garbage
    left out), against TRL's, forward and backward; the sequence ratios straddle both clip edges."""
    logps, _, _, mask, advantages = policy_batch(6, 9, 3)
    advantages = torch.tensor([0.0, -0.7, 1.0, 0.0, -0.6, 0.9], dtype=DT)
    ratios = torch.tensor([0.5, 0.6, 1.5, 1.0, 1.25, 1.1], dtype=DT)  # clipped low, high, inside the band
    old_seq = (logps * mask).sum(-1) - ratios.log()
    theirs_in, ours_in = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    theirs = trl_rloo_loss(theirs_in, old_seq, mask, advantages, eps_low, eps_high)
    ours = sequence_policy_loss((ours_in * mask).sum(-1), old_seq, advantages, eps_low, eps_high)
    torch.testing.assert_close(ours, theirs, **TOL)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, **TOL)
    ratio = torch.exp((logps * mask).sum(-1) - old_seq)
    assert ((ratio < 1 - eps_low) & (advantages != 0)).any() and ((ratio > 1.28) & (advantages != 0)).any()


def test_policy_loss_takes_per_token_advantages():
    """PPO's per-token advantages (B, T): a (B,) advantage broadcast to every token gives the same loss."""
    logps, old, _, mask, advantages = policy_batch(5, 7, 0)
    for loss_type in ("grpo", "bnpo"):
        torch.testing.assert_close(policy_loss(logps, old, advantages[:, None].expand(5, 7), mask, loss_type),
                                   policy_loss(logps, old, advantages, mask, loss_type), **TOL)


def test_policy_batch_clips_on_both_sides():
    """The oracle test above exercises both clip edges and the asymmetric band: some masked tokens with A ≠ 0
    have a ratio below 1 − 0.2, some above 1 + 0.28, some in (1.2, 1.28]."""
    for B, T, seed in [(5, 7, 0), (6, 13, 1)]:
        logps, old, _, mask, advantages = policy_batch(B, T, seed)
        ratio = torch.exp(logps - old)[mask.bool() & (advantages != 0)[:, None]]
        assert (ratio < 0.8).any() and (ratio > 1.28).any() and ((ratio > 1.2) & (ratio <= 1.28)).any()


# -- group and leave-one-out advantages against _generate_and_score_completions --------------------------

def trl_generate_and_score(trainer, rewards, G, **options):
    """trainer._generate_and_score_completions on a stub: _generate returns a 2-token prompt and a completion of
    1..4 tokens per row, _calculate_rewards returns `rewards` as the one reward function's column."""
    B = rewards.numel()
    completions = [[7] * (1 + i % 4) for i in range(B)]

    def generate(prompts):
        if trainer.__name__ == "RLOOTrainer":  # prompt ids, completion ids, texts
            return [[1, 2]] * B, completions, ["text"] * B
        # GRPO: prompt ids, completion ids, tool mask, texts, sampling logps, extra fields, images, tool images
        return [[1, 2]] * B, completions, None, ["text"] * B, None, {}, None, [[]] * B

    stub = types.SimpleNamespace(
        accelerator=accelerator(), model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        environment_factories=None, tools=None, environments=None, _generate=generate,
        _tokenizer=types.SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
        args=types.SimpleNamespace(per_device_train_batch_size=B, steps_per_generation=1,
                                   gradient_accumulation_steps=1, gradient_checkpointing_kwargs=None),
        num_iterations=1, use_vllm=False, beta=0.0, num_generations=G, reward_clip_range=None,
        _calculate_rewards=lambda *args: rewards[:, None], reward_weights=torch.ones(1, dtype=rewards.dtype),
        reward_func_names=["r"], _metrics=metrics(), _pending_extra_logs={}, _pending_metrics={},
        _logs=collections.defaultdict(list, rewards=collections.defaultdict(list),
                                      extra=collections.defaultdict(list)),
        log_multimodal=False,
        _get_per_token_logps_and_entropies=lambda model, ids, mask, keep, *args, **kw: (
            torch.zeros(ids.shape[0], keep, dtype=DT), None, None),  # RLOO's old log-probs: unused at β = 0
        **options)
    return trainer._generate_and_score_completions(stub, [{"prompt": "p"}] * B)


def rewards_with_a_flat_group(B, G, seed):
    """N(0, 1) rewards, group 1 all 0.7 (std 0: its advantages are 0 under every scale)."""
    rewards = torch.randn(B, generator=torch.Generator().manual_seed(seed), dtype=DT)
    rewards[G:2 * G] = 0.7
    return rewards


@pytest.mark.parametrize("G,B", [(4, 12), (3, 12)])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_grpo(scale, G, B):
    from trl import GRPOTrainer

    rewards = rewards_with_a_flat_group(B, G, seed=G)
    theirs = trl_generate_and_score(GRPOTrainer, rewards, G, scale_rewards=scale,
                                    multi_objective_aggregation="sum_then_normalize")["advantages"]
    ours = group_advantages(rewards, G, scale=scale)
    assert ours.shape == (B,)
    torch.testing.assert_close(ours, theirs, **(TOL if scale == "none" else STD_TOL))
    assert theirs[G:2 * G].abs().max() < 1e-9 and theirs.abs().min() < theirs.abs().max()


def test_trl_num_items_in_batch_is_the_token_count():
    """dapo's normalizer as TRL hands it to _compute_loss: the completion tokens of the batch (1..4 per row)."""
    from trl import GRPOTrainer

    out = trl_generate_and_score(GRPOTrainer, rewards_with_a_flat_group(12, 4, 0), 4, scale_rewards="group",
                                 multi_objective_aggregation="sum_then_normalize")
    assert out["completion_mask"].sum().item() == out["num_items_in_batch"].item() == 3 * (1 + 2 + 3 + 4)


@pytest.mark.parametrize("G,B", [(3, 9), (4, 12)])
def test_rloo_advantages_match_trl_rloo(G, B):
    from trl import RLOOTrainer

    rewards = rewards_with_a_flat_group(B, G, seed=10 + G)
    theirs = trl_generate_and_score(RLOOTrainer, rewards, G, normalize_advantages=False)["advantages"]
    ours = rloo_advantages(rewards, G)
    assert ours.shape == (B,)
    torch.testing.assert_close(ours, theirs, **TOL)


# -- KTO against KTOTrainer._compute_loss ---------------------------------------------------------------

def kto_batch(labels, seed, kl_shift):
    """Per-token log-probs (B, L − 1) of B completions and of B mismatched KL completions, zero off the
    completion (as the fused LM head returns them for labels −100), and the reference sequence sums. The
    reference KL sums are the policy's minus `kl_shift` plus N(0, 1): kl_shift > 0 puts the KL estimate above 0,
    < 0 below (clamped to 0)."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(labels), 9
    masks = []
    for _ in range(2):
        n = torch.randint(2, L - 1, (B,), generator=g)
        masks.append((torch.arange(L)[None, :] >= L - n[:, None]).long())  # (B, L), n completion tokens at the end
    per_tok, kl_per_tok = (-2 * torch.rand(B, L - 1, generator=g, dtype=DT) * m[:, 1:] for m in masks)
    ref = per_tok.sum(1) + 3 * torch.randn(B, generator=g, dtype=DT)
    ref_kl = kl_per_tok.sum(1) - kl_shift + torch.randn(B, generator=g, dtype=DT)
    return per_tok, kl_per_tok, ref, ref_kl, masks


def trl_kto(per_tok, kl_per_tok, ref, ref_kl, masks, labels, beta, w_d, w_u):
    """KTOTrainer._compute_loss (train mode, precomputed reference) and the stub's logged metrics."""
    from trl import KTOTrainer

    B, L = masks[0].shape  # the KL batch (masks[1]) may have more rows: the per-example runs below
    ids, kl_ids = torch.ones(B, L, dtype=torch.long), 2 * torch.ones(masks[1].shape, dtype=torch.long)

    def model(input_ids, attention_mask, labels, use_cache, fused_lm_head):
        assert input_ids is kl_ids or input_ids is ids
        out = kl_per_tok if input_ids is kl_ids else per_tok  # (rows, L − 1)
        return types.SimpleNamespace(log_probs=out, entropy=torch.zeros_like(out.detach()),
                                     mean_logits=torch.zeros_like(out.detach()))

    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=accelerator(), calculate_KL=True,
        precompute_ref_logps=True, aux_loss_enabled=False, loss_type="kto", beta=beta, desirable_weight=w_d,
        undesirable_weight=w_u, _metrics=metrics(), _total_train_tokens=0, _tp_size=1)
    stub._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stub)
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.long), "completion_mask": masks[0],
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
             "KL_completion_mask": masks[1], "label": torch.tensor(labels), "ref_logps": ref,
             "ref_KL_logps": ref_kl}
    return KTOTrainer._compute_loss(stub, model, batch, False), stub._metrics["train"]


KTO_LABELS = {"mixed": [True, False, False, True, True, False], "all_desirable": [True] * 5,
              "all_undesirable": [False] * 4}


@pytest.mark.parametrize("kl_shift", [1.5, -1.5], ids=["kl>0", "kl<0_clamped"])
@pytest.mark.parametrize("name", list(KTO_LABELS))
def test_kto_kl_matches_trl(name, kl_shift):
    labels = KTO_LABELS[name]
    per_tok, kl_per_tok, ref, ref_kl, masks = kto_batch(labels, seed=len(labels), kl_shift=kl_shift)
    _, logged = trl_kto(per_tok, kl_per_tok, ref, ref_kl, masks, labels, 0.1, 1.0, 1.0)
    ours = kto_kl(kl_per_tok.sum(1).requires_grad_(), ref_kl)
    assert not ours.requires_grad and ours.dim() == 0
    torch.testing.assert_close(ours.item(), logged["kl"][-1], **TOL)
    assert (logged["kl"][-1] > 0.1) == (kl_shift > 0)  # the clamp holds the negative estimate at 0


@pytest.mark.parametrize("beta,w_d,w_u", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.7)])
@pytest.mark.parametrize("kl_shift", [1.5, -1.5], ids=["kl>0", "kl<0_clamped"])
@pytest.mark.parametrize("name", list(KTO_LABELS))
def test_kto_loss_matches_trl(name, kl_shift, beta, w_d, w_u):
    """The batch mean and its gradient; then each example alone (TRL's loss of a one-example batch, the same KL
    batch) for the per-example losses and rewards. The KL fed to ours is the one TRL logged."""
    labels = KTO_LABELS[name]
    per_tok, kl_per_tok, ref, ref_kl, masks = kto_batch(labels, seed=len(labels), kl_shift=kl_shift)
    theirs_in = per_tok.clone().requires_grad_()
    theirs, logged = trl_kto(theirs_in, kl_per_tok, ref, ref_kl, masks, labels, beta, w_d, w_u)
    kl = torch.tensor(logged["kl"][-1], dtype=DT)
    ours_in = per_tok.clone().requires_grad_()
    out = kto_loss(ours_in.sum(1), ref, torch.tensor(labels), kl, beta=beta, desirable_weight=w_d,
                   undesirable_weight=w_u)
    assert out.losses.shape == out.rewards.shape == (len(labels),)
    torch.testing.assert_close(out.losses.mean(), theirs, **TOL)
    theirs.backward()
    out.losses.mean().backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, **TOL)

    for i, label in enumerate(labels):
        one, logged = trl_kto(per_tok[i:i + 1], kl_per_tok, ref[i:i + 1], ref_kl,
                              [masks[0][i:i + 1], masks[1]], [label], beta, w_d, w_u)
        torch.testing.assert_close(out.losses[i], one, **TOL)
        reward = logged["rewards/chosen" if label else "rewards/rejected"][-1]
        torch.testing.assert_close(out.rewards[i].item(), reward, **TOL)
    assert not out.rewards.requires_grad


# -- reward_loss against RewardTrainer.compute_loss -----------------------------------------------------

def trl_reward_loss(chosen, rejected, margin, center):
    from trl import RewardTrainer

    def model(attention_mask, use_cache, **kw):
        return types.SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])  # (2B, 1)

    stub = types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=accelerator(),
                                 args=types.SimpleNamespace(center_rewards_coefficient=center),
                                 _metrics=metrics(), _total_train_tokens=0, _tp_size=1)
    inputs = {"attention_mask": torch.ones(2 * chosen.numel(), 4, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(stub, model, inputs)


@pytest.mark.parametrize("center", [None, 0.01, 0.3])
@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_loss_matches_trl(with_margin, center):
    g = torch.Generator().manual_seed(5)
    chosen, rejected = (2 * torch.randn(7, generator=g, dtype=DT) + 0.5 for _ in range(2))
    margin = torch.rand(7, generator=g, dtype=DT) if with_margin else None
    theirs_in = [chosen.clone().requires_grad_(), rejected.clone().requires_grad_()]
    ours_in = [chosen.clone().requires_grad_(), rejected.clone().requires_grad_()]
    theirs = trl_reward_loss(*theirs_in, margin, center)
    ours = reward_loss(*ours_in, margin=margin, center_coefficient=center)
    assert ours.shape == ()
    torch.testing.assert_close(ours, theirs, **TOL)
    theirs.backward()
    ours.backward()
    for a, b in zip(ours_in, theirs_in):
        torch.testing.assert_close(a.grad, b.grad, **TOL)
