"""Tests for grpo_loss.py: advantage, k3 KL, the clipped loss (both averagings) and its gradient equal
hand-computed values, and the loss summed over groups is the batch's.

    python -m pytest -q test_grpo_loss.py"""

import math

import torch

import grpo_loss


def test_group_advantages():
    A = grpo_loss.group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    std = math.sqrt((1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3)  # unbiased: n − 1 = 3
    torch.testing.assert_close(A, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4))
    same = grpo_loss.group_advantages(torch.tensor([0.7, 0.7, 0.7]))
    assert torch.equal(same, torch.zeros(3))  # no signal, exactly zero


def test_k3_kl():
    logp, ref = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 0.5]))
    # x = ref − logp = log(1/2): e^x − x − 1 = 0.5 + log 2 − 1; identical distributions: 0
    torch.testing.assert_close(grpo_loss.k3_kl(logp, ref), torch.tensor([0.5 + math.log(2) - 1, 0.0]))


def _loss_inputs():
    ratio = torch.tensor([[1.0, 1.5, 0.5], [0.7, 1.1, 1.3]])
    logp = torch.log(torch.tensor([[0.3, 0.2, 0.1], [0.4, 0.5, 0.6]])).requires_grad_(True)
    old = logp.detach() - torch.log(ratio)  # so that exp(logp − old) = ratio
    ref = logp.detach() + math.log(2)  # π_ref = 2·π_θ everywhere: k3 = 2 − log 2 − 1
    A = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return logp, old, ref, A, mask


def test_grpo_loss_hand_computed():
    c = 0.04 * (2 - math.log(2) - 1)  # β·KL, the same at every token
    # surrogate min(ρA, clip(ρ, 0.8, 1.2)·A): row 0 (A = +1): 1, min(1.5, 1.2) = 1.2, [masked];
    # row 1 (A = −1): min(−0.7, −0.8) = −0.8, −1.1, min(−1.3, −1.2) = −1.3
    seq = ((-(1 + 1.2) / 2 + c) + ((0.8 + 1.1 + 1.3) / 3 + c)) / 2  # mean over tokens, then over completions
    tok = (-(1 + 1.2) + (0.8 + 1.1 + 1.3)) / 5 + c  # mean over all 5 tokens
    for avg, want in (("sequence", seq), ("token", tok)):
        logp, old, ref, A, mask = _loss_inputs()
        loss, stats = grpo_loss.grpo_loss(logp, old, ref, A, mask, epsilon=0.2, beta=0.04, loss_avg=avg)
        assert abs(loss.item() - want) < 1e-6, (avg, loss.item(), want)
        assert int(stats["clipped"]) == 2  # row 0 token 1 (ρ > 1.2, A > 0), row 1 token 0 (ρ < 0.8, A < 0)
        torch.testing.assert_close(stats["kl"], torch.full((2,), c / 0.04))
    # gradient, sequence averaging: d/dlogp of −ρA + β·k3 is −ρA − β·(π_ref/π_θ − 1) = −ρA − 0.04 where the
    # surrogate is not clipped, and −0.04 where it is; each divided by |o_i| and by the 2 completions.
    logp, old, ref, A, mask = _loss_inputs()
    grpo_loss.grpo_loss(logp, old, ref, A, mask, epsilon=0.2, beta=0.04)[0].backward()
    want = torch.tensor([[(-1.0 - 0.04) / 4, -0.04 / 4, 0.0],
                         [-0.04 / 6, (1.1 - 0.04) / 6, (1.3 - 0.04) / 6]])
    torch.testing.assert_close(logp.grad, want)


def test_grpo_loss_accumulates_to_the_batch_loss():
    """The update sums the loss over groups with the step's n_seqs / n_tokens: that must be the batch's loss."""
    torch.manual_seed(0)
    logp, old, ref = torch.randn(3, 6, 5).unbind(0)  # three (6, 5) tensors
    A, mask = torch.randn(6), torch.rand(6, 5) > 0.3
    mask[:, 0] = True
    for avg in ("sequence", "token"):
        whole = grpo_loss.grpo_loss(logp, old, ref, A, mask, loss_avg=avg)[0]
        parts = sum(grpo_loss.grpo_loss(logp[s], old[s], ref[s], A[s], mask[s], loss_avg=avg, n_seqs=6,
                                   n_tokens=int(mask.sum()))[0] for s in (slice(0, 2), slice(2, 6)))
        torch.testing.assert_close(parts, whole)
