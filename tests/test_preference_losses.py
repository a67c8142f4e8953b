"""The DPO-family preference losses: hand-derived values, TRL 1.16 as oracle, gradients, invariants, errors.

Hand values. One pair, β = 0.1: log π(y_w) = −10, log π(y_l) = −12, log π_ref = −11 for both, |y_w| = 4,
|y_l| = 5. So c = −10 + 11 = 1, r = −12 + 11 = −1, h = c − r = 2, βh = 0.2, βc = 0.1, βr = −0.1;
h_avg = 1/4 + 1/5 = 0.45; a_w = −10/4 = −2.5, a_l = −12/5 = −2.4. With ℓ(z) = −log σ(z) = log(1 + e^{−z})
and ℓ(−z) = ℓ(z) + z:
    ℓ(0.2) = 0.598138869,  ℓ(−0.2) = 0.798138869,  ℓ(0.1) = 0.644396660,  ℓ(−0.1) = 0.744396660
    σ(0.2) = 0.549833997,  σ(−0.2) = 0.450166003,  σ(0.1) = 0.524979187,  σ(−0.1) = 0.475020813
The literals carry 9-10 significant digits (worked out with `math`, rounding error < 1e-9); the fp32
computation is a handful of correctly rounded operations on O(1) numbers, a few ulps (1.2e-7 relative
each), hence rtol 1e-6 with atol 1e-7.

TRL oracle. TRL's DPOTrainer._compute_loss runs on a stub with a fake model that returns given per-token
log-probs (B = 7 pairs, completion lengths 3..11): TRL sums them over the row, we are given the same row
sums, so both see bit-identical sequence log-probs and differ only in the order of a few fp32 operations
after that (values ≤ 60 for the squared losses, so atol 1e-5 with rtol 1e-6). TRL returns the mean over
pairs, compared with our losses.mean().
"""

import collections
import math
import types

import pytest
import torch

from minicustom.losses import LOSS_TYPES, preference_loss

HAND = dict(policy_chosen_logps=torch.tensor([-10.0]), policy_rejected_logps=torch.tensor([-12.0]),
            ref_chosen_logps=torch.tensor([-11.0]), ref_rejected_logps=torch.tensor([-11.0]),
            chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([5]), beta=0.1)

HAND_CASES = [  # (loss_type, extra arguments, expected loss of the pair)
    ("sigmoid", {}, 0.598138869),  # ℓ(βh) = ℓ(0.2)
    # cDPO: 0.9 ℓ(0.2) + 0.1 ℓ(−0.2) = ℓ(0.2) + 0.1 · 0.2
    ("sigmoid", {"label_smoothing": 0.1}, 0.618138869),
    # (0.9 ℓ(0.2) − 0.1 ℓ(−0.2)) / 0.8 = ℓ(0.2) − 0.1 · 0.2 / 0.8 = 0.598138869 − 0.025
    ("robust", {"label_smoothing": 0.1}, 0.573138869),
    ("hinge", {}, 0.8),  # max(0, 1 − 0.2)
    ("ipo", {}, 20.7025),  # (h_avg − 1/(2β))² = (0.45 − 5)² = 4.55²
    # σ(0.2)(−ℓ(0.2) − log 0.999) + σ(−0.2)(−ℓ(−0.2) − log 0.001),
    # log 0.999 = −0.001000500, log 0.001 = −6.907755279:
    # 0.549833997 · (−0.597138369) + 0.450166003 · 6.109616410 = −0.328326957 + 2.750341578
    ("exo_pair", {"label_smoothing": 1e-3}, 2.422014621),
    ("nca_pair", {}, 1.338793320),  # ℓ(βc) + ½ℓ(−βc) + ½ℓ(−βr) = 1.5 ℓ(0.1) + 0.5 ℓ(−0.1)
    ("bco_pair", {}, 1.288793320),  # ℓ(βc) + ℓ(−βr) = 2 ℓ(0.1)
    ("sppo_hard", {}, 32.0),  # (c − 5)² + (r + 5)² = 16 + 16
    ("aot", {}, 0.598138869),  # one pair: δ = (−10 + 12) − (−11 + 11) = 2 = h, so ℓ(0.2) (sorting: see below)
    ("aot_unpaired", {}, 0.598138869),  # δ = c − r = 2
    ("apo_zero", {}, 0.950041625),  # 1 − σ(0.1) + σ(−0.1) = 2 σ(−0.1)
    ("apo_down", {}, 0.975145190),  # σ(0.1) + 1 − σ(0.2) = 0.524979187 + 0.450166003
    # m = σ(0.2 / 0.05) = σ(4) = 0.982013790, e^{−0.2} = 0.818730753:
    # (1 − m) ℓ(0.2) + m e^{−0.2} = 0.017986210 · 0.598138869 + 0.982013790 · 0.818730753
    ("discopop", {}, 0.814763141),
    ("sigmoid_norm", {}, 0.670900284),  # ℓ(β h_avg) = ℓ(0.045) = log(1 + e^{−0.045})
    ("sft", {}, 2.5),  # −log π(y_w) / |y_w| = 10 / 4
    # β(a_w − a_l) − γ = 0.1 · (−0.1) − 0.5 = −0.51; ℓ(−0.51) = log(1 + e^{0.51})
    ("simpo", {}, 0.980313318),
    # log(1 − e^{−2.5}) = −0.085650484, log(1 − e^{−2.4}) = −0.095099951,
    # log odds ratio = (−2.5 + 2.4) − (−0.085650484 + 0.095099951) = −0.109449467,
    # ℓ(−0.109449467) = 0.749368565;
    # −a_w + β ℓ = 2.5 + 0.0749368565
    ("orpo", {}, 2.574936857),
]


def test_hand_cases_cover_every_loss_type():
    assert {t for t, _, _ in HAND_CASES} == set(LOSS_TYPES)


@pytest.mark.parametrize("loss_type,extra,expected", HAND_CASES, ids=[f"{t}{e}" for t, e, _ in HAND_CASES])
def test_hand_computed(loss_type, extra, expected):
    out = preference_loss(**HAND, loss_type=loss_type, **extra)
    torch.testing.assert_close(out.losses, torch.tensor([expected]), rtol=1e-6, atol=1e-7)
    # rewards: β c = 0.1, β r = −0.1; SimPO and ORPO: β a_w = −0.25, β a_l = −0.24
    rewards = (-0.25, -0.24) if loss_type in ("simpo", "orpo") else (0.1, -0.1)
    torch.testing.assert_close((out.chosen_rewards.item(), out.rejected_rewards.item()), rewards)


def test_aot_sorts_over_the_batch():
    """Two pairs: the first as above (policy margin log π(y_w) − log π(y_l) = 2, reference margin 0, c = 1,
    r = −1); the second log π = (−9, −8), log π_ref = (−8, −9): policy margin −1, reference margin 1, c = −1,
    r = 1.

    aot: sort([2, −1]) − sort([0, 1]) = [−1, 2] − [0, 1] = [−1, 1], losses ℓ(−0.1), ℓ(0.1) = 0.744396660,
    0.644396660 (pair by pair it would be [2, −2]). aot_unpaired: sort(c) − sort(r) = [−1, 1] − [−1, 1] = 0,
    losses log 2 = 0.693147181 (pair by pair, h = [2, −2])."""
    pairs = dict(policy_chosen_logps=torch.tensor([-10.0, -9.0]),
                 policy_rejected_logps=torch.tensor([-12.0, -8.0]),
                 ref_chosen_logps=torch.tensor([-11.0, -8.0]), ref_rejected_logps=torch.tensor([-11.0, -9.0]))
    torch.testing.assert_close(preference_loss(**pairs, loss_type="aot").losses,
                               torch.tensor([0.744396660, 0.644396660]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(preference_loss(**pairs, loss_type="aot_unpaired").losses,
                               torch.tensor([0.693147181, 0.693147181]), rtol=1e-6, atol=1e-7)


# -- TRL 1.16 as oracle -------------------------------------------------------------------------------

def random_batch(B=7, seed=0, equal_chosen=False):
    """Per-token log-probs (2B, T−1) of B chosen then B rejected completions (zero off the completion), the
    (2B, T) completion mask, and what preference_loss takes: row sums and lengths. Reference log-probs are
    the policy's plus N(0, 1) per token, so the log-ratios are O(1) and βh is not saturated."""
    g = torch.Generator().manual_seed(seed)
    n_w = torch.full((B,), 6) if equal_chosen else torch.randint(3, 12, (B,), generator=g)
    n_l = torch.randint(3, 12, (B,), generator=g)
    T = int(max(n_w.max(), n_l.max())) + 2
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(torch.cat([n_w, n_l]).tolist()):
        mask[i, 1:1 + n] = 1  # a prompt token first; position t of the shifted mask predicts token t + 1
    shifted = mask[:, 1:].float()  # (2B, T−1)
    per_tok = -2 * torch.rand(2 * B, T - 1, generator=g) * shifted
    ref_per_tok = (per_tok + torch.randn(2 * B, T - 1, generator=g)) * shifted
    logps, ref_logps = per_tok.sum(1), ref_per_tok.sum(1)  # the sums TRL takes itself
    ours = dict(policy_chosen_logps=logps[:B], policy_rejected_logps=logps[B:],
                ref_chosen_logps=ref_logps[:B], ref_rejected_logps=ref_logps[B:],
                chosen_lengths=n_w, rejected_lengths=n_l)
    return per_tok, mask, ours


def trl_dpo(per_tok, mask, ours, loss_types, weights, beta, label_smoothing, tau=0.05):
    """TRL's DPOTrainer._compute_loss (mean over pairs) on a stub whose model returns per_tok, and the stub's
    logged metrics."""
    from trl import DPOTrainer

    zero = torch.zeros_like(per_tok)  # entropy, logits, top-1 hits: only logged
    out = types.SimpleNamespace(log_probs=per_tok, entropy=zero, mean_logits=zero, is_top1=zero.bool())
    acc = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x,
                                unwrap_model=lambda m: m)
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=False), accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types,
        loss_weights=weights, beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=tau), _total_train_tokens=0, _tp_size=1,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": ours["ref_chosen_logps"],
              "ref_rejected_logps": ours["ref_rejected_logps"]}
    return DPOTrainer._compute_loss(stub, lambda **kw: out, inputs, False), stub._metrics["eval"]


TRL_DPO_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
EPS = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}  # 0 for sigmoid: TRL's ignores ε
MIXES = [  # (loss types, weights, ε)
    (["sigmoid", "sft"], [1.0, 0.5], 0.0),  # RPO with α = 0.5
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0),  # MPO (Wang et al. 2024), weights from TRL's docs
    (["robust", "exo_pair", "discopop", "ipo"], [0.3, 1.0, 2.0, 0.1], 0.1),
]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_types,weights,eps",
                         [([t], [1.0], EPS.get(t, 0.0)) for t in TRL_DPO_TYPES] + MIXES,
                         ids=TRL_DPO_TYPES + ["+".join(m[0]) for m in MIXES])
def test_matches_trl_dpo(loss_types, weights, eps, beta):
    """TRL's `sft` is the NLL per token over all chosen tokens of the batch, ours per pair (as RPO): the two
    means agree when every |y_w| is the same, so a mix with `sft` gets equal chosen lengths (6); see
    test_sft_against_trl_with_unequal_lengths for the general relation."""
    per_tok, mask, ours = random_batch(equal_chosen="sft" in loss_types)
    theirs, metrics = trl_dpo(per_tok, mask, ours, loss_types, weights, beta, eps)
    out = preference_loss(**ours, loss_type=loss_types, loss_weights=weights, beta=beta, label_smoothing=eps)
    assert out.losses.shape == (7,)
    torch.testing.assert_close(out.losses.mean(), theirs, rtol=1e-6, atol=1e-5)
    # TRL logs the batch means of β c and β r
    torch.testing.assert_close(out.chosen_rewards.mean().item(), metrics["rewards/chosen"][-1],
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards.mean().item(), metrics["rewards/rejected"][-1],
                               rtol=1e-6, atol=1e-6)


def test_rpo_alpha_matches_trl_sigmoid_plus_sft():
    per_tok, mask, ours = random_batch(seed=1, equal_chosen=True)
    theirs, _ = trl_dpo(per_tok, mask, ours, ["sigmoid", "sft"], [1.0, 0.7], 0.1, 0.0)
    ours_rpo = preference_loss(**ours, rpo_alpha=0.7).losses.mean()
    torch.testing.assert_close(ours_rpo, theirs, rtol=1e-6, atol=1e-5)


def test_sft_against_trl_with_unequal_lengths():
    """TRL: −Σ_b log π(y_w,b) / Σ_b |y_w,b|, a token-weighted mean of our per-pair −log π(y_w,b)/|y_w,b|."""
    per_tok, mask, ours = random_batch(seed=2)
    theirs, _ = trl_dpo(per_tok, mask, ours, ["sft"], [1.0], 0.1, 0.0)
    losses, n_w = preference_loss(**ours, loss_type="sft").losses, ours["chosen_lengths"].float()
    torch.testing.assert_close((n_w * losses).sum() / n_w.sum(), theirs, rtol=1e-6, atol=1e-6)
    assert abs(losses.mean() - theirs) > 1e-3  # the plain mean is another number at these lengths


def trl_cpo(loss_type, beta, eps, gamma, chosen, rejected):
    from trl.experimental.cpo import CPOTrainer

    stub = types.SimpleNamespace(alpha=0.0, loss_type=loss_type, simpo_gamma=gamma, beta=beta,
                                 label_smoothing=eps, accelerator=types.SimpleNamespace(device="cpu"))
    return CPOTrainer.cpo_loss(stub, chosen, rejected)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_conservative_dpo_matches_trl_cpo(eps):
    """CPO's sigmoid loss is −(1 − ε) log σ(β(x_w − x_l)) − ε log σ(−β(x_w − x_l)) of its inputs; given the
    log-ratios c and r it is cDPO on h = c − r."""
    _, _, ours = random_batch(seed=3)
    c = ours["policy_chosen_logps"] - ours["ref_chosen_logps"]
    r = ours["policy_rejected_logps"] - ours["ref_rejected_logps"]
    losses, chosen_rewards, rejected_rewards = trl_cpo("sigmoid", 0.1, eps, 0.0, c, r)
    out = preference_loss(**ours, label_smoothing=eps)
    torch.testing.assert_close(out.losses, losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.1)])
def test_simpo_matches_trl_cpo(beta, gamma, eps):
    """TRL's CPO `simpo` on the average log-probs a_w, a_l (SimPO's β ≈ 2-2.5 and γ ≈ 0.5-1.4)."""
    _, _, ours = random_batch(seed=4)
    a_w = ours["policy_chosen_logps"] / ours["chosen_lengths"]
    a_l = ours["policy_rejected_logps"] / ours["rejected_lengths"]
    losses, chosen_rewards, rejected_rewards = trl_cpo("simpo", beta, eps, gamma, a_w, a_l)
    out = preference_loss(**ours, loss_type="simpo", beta=beta, label_smoothing=eps, simpo_gamma=gamma)
    torch.testing.assert_close(out.losses, losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards, rtol=1e-6, atol=1e-6)
    # reference-free: the reference log-probs play no part
    alone = {k: v for k, v in ours.items() if not k.startswith("ref_")}
    torch.testing.assert_close(preference_loss(**alone, loss_type="simpo", beta=beta, label_smoothing=eps,
                                               simpo_gamma=gamma).losses, out.losses, rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl(beta):
    """ORPOTrainer.odds_ratio_loss gives β log σ(log odds ratio) per pair and the trainer's loss is
    NLL − mean(that), NLL the chosen tokens' mean cross-entropy (= mean of −a_w at equal |y_w|): per pair,
    ours is −a_w − (TRL's term). Average log-probs down to −0.01 probe log(1 − e^a) near a = 0."""
    from trl.experimental.orpo import ORPOTrainer

    _, _, ours = random_batch(seed=5)
    ours["policy_chosen_logps"][0] = -0.01 * ours["chosen_lengths"][0]
    a_w = ours["policy_chosen_logps"] / ours["chosen_lengths"]
    a_l = ours["policy_rejected_logps"] / ours["rejected_lengths"]
    stub = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device="cpu"))
    ratio_term, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(stub, a_w, a_l)
    out = preference_loss(**ours, loss_type="orpo", beta=beta, reference_free=True)
    torch.testing.assert_close(out.losses, -a_w - ratio_term, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards, rtol=1e-6, atol=1e-6)


# -- gradients and invariants -------------------------------------------------------------------------

def test_sigmoid_gradient_is_closed_form():
    """d(−log σ(βh))/dh = −β σ(−βh), and dh/d log π(y_w) = 1, dh/d log π(y_l) = −1. Margins up to βh = ±1000,
    where σ(βh) is 1 or 0 in fp32 (σ(−100) = 3.7e-44 is subnormal): log σ formed as log(σ) would be −inf
    there; logsigmoid keeps loss and gradient finite."""
    h = torch.tensor([-1e4, -1e3, -50.0, -2.0, 0.0, 0.5, 3.0, 50.0, 1e3, 1e4])
    logp_w = h.clone().requires_grad_()
    logp_l = torch.zeros_like(h, requires_grad=True)
    zeros = torch.zeros_like(h)
    out = preference_loss(logp_w, logp_l, zeros, zeros, beta=0.1)
    g_w, g_l = torch.autograd.grad(out.losses.sum(), [logp_w, logp_l])
    expected = (-0.1 * torch.sigmoid(-0.1 * h.double())).float()
    assert torch.isfinite(out.losses).all() and torch.isfinite(g_w).all()
    # −log σ(−z) = z + log(1 + e^{−z}): 1000 and 100 to fp32 precision
    torch.testing.assert_close(out.losses[:2], torch.tensor([1000.0, 100.0]))
    torch.testing.assert_close(g_w, expected, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(g_l, -expected, rtol=1e-6, atol=1e-30)


def test_discopop_finite_at_large_negative_margin():
    """z = βh = −100: m = σ(−2000) is 0 in fp32 and e^{100} is inf, so the product m e^{−z} is NaN when formed
    as written (TRL 1.16 does); exactly it is e^{−1900} ≈ 0, and the loss (1 − m) ℓ(z) = ℓ(−100) = 100."""
    zero = torch.tensor([0.0])
    out = preference_loss(torch.tensor([-1000.0]), zero, zero, zero, loss_type="discopop", beta=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([100.0]))


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    g = torch.Generator().manual_seed(6)
    logp_w, logp_l = -50 * torch.rand(9, generator=g), -50 * torch.rand(9, generator=g)
    out = preference_loss(logp_w, logp_l, logp_w.clone(), logp_l.clone(), beta=0.3)
    torch.testing.assert_close(out.losses, torch.full((9,), math.log(2)), rtol=0, atol=0)  # log σ(0) exactly
    assert (out.chosen_rewards == 0).all() and (out.rejected_rewards == 0).all()


def test_robust_with_zero_noise_is_dpo():
    _, _, ours = random_batch(seed=7)
    robust = preference_loss(**ours, loss_type="robust").losses
    torch.testing.assert_close(robust, preference_loss(**ours).losses, rtol=0, atol=0)  # same fp32 operations


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot", "apo_down", "simpo"])
def test_reference_free_is_zero_reference(loss_type):
    _, _, ours = random_batch(seed=8)
    zeros = torch.zeros(7)
    free = preference_loss(ours["policy_chosen_logps"], ours["policy_rejected_logps"], loss_type=loss_type,
                           chosen_lengths=ours["chosen_lengths"], rejected_lengths=ours["rejected_lengths"],
                           reference_free=True)
    zero_ref = preference_loss(**{**ours, "ref_chosen_logps": zeros, "ref_rejected_logps": zeros},
                               loss_type=loss_type)
    torch.testing.assert_close(free.losses, zero_ref.losses, rtol=0, atol=0)
    torch.testing.assert_close(free.chosen_rewards, zero_ref.chosen_rewards, rtol=0, atol=0)


def test_weighted_list_is_weighted_sum_of_single_losses():
    _, _, ours = random_batch(seed=9)
    kinds, weights = ["ipo", "hinge", "nca_pair", "sft"], [0.25, 2.0, -1.0, 0.5]
    mixed = preference_loss(**ours, loss_type=kinds, loss_weights=weights, beta=0.2).losses
    alone = sum(w * preference_loss(**ours, loss_type=t, beta=0.2).losses for t, w in zip(kinds, weights))
    torch.testing.assert_close(mixed, alone)


def test_rpo_alpha_adds_the_chosen_nll():
    _, _, ours = random_batch(seed=10)
    rpo = preference_loss(**ours, rpo_alpha=0.3)
    mix = preference_loss(**ours, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3])
    torch.testing.assert_close(rpo.losses, mix.losses)
    # and the added term is −log π(y_w)/|y_w| per pair
    torch.testing.assert_close(rpo.losses - preference_loss(**ours).losses,
                               -0.3 * ours["policy_chosen_logps"] / ours["chosen_lengths"])


def test_half_precision_inputs_are_computed_in_float32():
    _, _, ours = random_batch(seed=11)
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ours.items()}
    out = preference_loss(**half, loss_type="ipo")
    assert out.losses.dtype == torch.float32
    torch.testing.assert_close(out.losses, preference_loss(**{k: v.float() for k, v in half.items()},
                                                           loss_type="ipo").losses, rtol=0, atol=0)


# -- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="dpo"), r"loss_type 'dpo'.*sigmoid, robust, hinge.*orpo"),
    (dict(loss_type=["sigmoid", "kto"]), r"loss_type.*kto.*expected one or more of sigmoid"),
    (dict(loss_type=[]), r"loss_type"),
    (dict(loss_type="ipo", chosen_lengths=None), r"ipo.*chosen_lengths and rejected_lengths"),
    (dict(rpo_alpha=1.0, rejected_lengths=None), r"rpo_alpha.*chosen_lengths and rejected_lengths"),
    (dict(ref_chosen_logps=None), r"'sigmoid'.*ref_chosen_logps and ref_rejected_logps.*reference_free"),
    (dict(loss_type="robust", label_smoothing=0.5), r"label_smoothing.*robust.*\[0, 0\.5\)"),
    (dict(loss_type="exo_pair", label_smoothing=0.0), r"label_smoothing.*exo_pair"),
    (dict(policy_rejected_logps=torch.zeros(3)), r"policy_rejected_logps has shape \(3,\); expected \(2,\)"),
    (dict(ref_chosen_logps=torch.zeros(2, 1)), r"ref_chosen_logps has shape \(2, 1\)"),
    (dict(chosen_lengths=torch.tensor([4])), r"chosen_lengths has shape \(1,\)"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), r"loss_weights has 1 entries for the 2"),
    (dict(beta=0.0), r"beta must be > 0"),
])
def test_errors_name_the_argument(kwargs, match):
    args = dict(policy_chosen_logps=torch.tensor([-3.0, -4.0]),
                policy_rejected_logps=torch.tensor([-5.0, -4.0]),
                ref_chosen_logps=torch.tensor([-3.5, -4.0]), ref_rejected_logps=torch.tensor([-4.5, -4.5]),
                chosen_lengths=torch.tensor([2, 3]), rejected_lengths=torch.tensor([4, 2]))
    with pytest.raises(ValueError, match=match):
        preference_loss(**{**args, **kwargs})
