"""PPO's pieces against numbers worked by hand: GAE as the textbook recursion on fixed rewards and values,
and the clipped value loss against its formula."""

import pytest
import torch

from minicustom.losses import gae, value_loss


def test_gae_follows_the_recursion_on_fixed_numbers():
    """One completion of 3 tokens then a pad, γ = 0.9, λ = 0.8:
        δ_2 = r_2 − V_2 = 1.0 − 0.5 = 0.5                 (nothing after the last token)
        δ_1 = r_1 + γ V_2 − V_1 = 0 + 0.45 − 0.4 = 0.05
        δ_0 = r_0 + γ V_1 − V_0 = −0.1 + 0.36 − 0.3 = −0.04
        A_2 = 0.5,  A_1 = 0.05 + 0.72 · 0.5 = 0.41,  A_0 = −0.04 + 0.72 · 0.41 = 0.2552
    The pad's reward and value (9.0, 7.0) must not leak in."""
    rewards = torch.tensor([[-0.1, 0.0, 1.0, 9.0]], dtype=torch.float64)
    values = torch.tensor([[0.3, 0.4, 0.5, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    A, R = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = torch.tensor([[0.2552, 0.41, 0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(A, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(R, expected + torch.tensor([[0.3, 0.4, 0.5, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_gae_with_lambda_one_and_gamma_one_is_the_return_minus_the_value():
    """λ = γ = 1: A_t = Σ_{k≥t} r_k − V_t (Monte Carlo), for every row of a batch of different lengths."""
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 1, 0])
    mask = (torch.arange(6)[None] < lengths[:, None]).long()
    A, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b in range(4):
        n = int(lengths[b])
        mc = torch.flip(torch.cumsum(torch.flip(rewards[b, :n], [0]), 0), [0]) - values[b, :n]
        torch.testing.assert_close(A[b, :n], mc, rtol=0, atol=1e-12)
        assert (A[b, n:] == 0).all()


@pytest.mark.parametrize("clip", [0.2, 10.0])
def test_value_loss_is_the_clipped_formula(clip):
    """V = 1.0 against V_old = 0.5 and R = 0: unclipped (V − R)² = 1; clipped V' = 0.5 + min(0.5, c): with
    c = 0.2, (0.7)² = 0.49; the max is 1, halved: 0.5. Second token V = 0.1, V_old = 0.5, R = 1: (0.9)² =
    0.81 against V' = 0.5 − min(0.4, c), c = 0.2: (0.7)² = 0.49; max 0.81, halved 0.405. Padding ignored."""
    values = torch.tensor([[1.0, 0.1, 5.0]], dtype=torch.float64)
    old = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    got = value_loss(values, old, returns, mask, clip=clip)
    first = max(1.0, (0.5 + min(0.5, clip)) ** 2)
    second = max(0.81, (1 - (0.5 - min(0.4, clip))) ** 2)
    assert got.item() == pytest.approx(0.5 * (first + second) / 2, abs=1e-12)
