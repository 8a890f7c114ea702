"""grpo_loss.py: the pieces of GRPO's objective, each a small pure function on tensors (torch only: a porter copies
this one file). grpo.py trains with them; bench.py times them; test_grpo_loss.py checks them by hand.

    A_i    = (r_i − mean(r)) / (std(r) + 1e-4)                                       over the group of G
    ρ_i,t  = π_θ(o_i,t | q, o_i,<t) / π_old(o_i,t | q, o_i,<t)
    KL_i,t = π_ref/π_θ − log(π_ref/π_θ) − 1                                          (k3 estimator, ≥ 0)
    L      = −1/G Σ_i 1/|o_i| Σ_t [ min(ρ_i,t·A_i, clip(ρ_i,t, 1−ε, 1+ε)·A_i) − β·KL_i,t ]
"""

from __future__ import annotations

import torch

EPSILON, BETA, ADV_EPS = 0.2, 0.04, 1e-4  # clip range ε, KL weight β, the advantage's std guard (paper)


def group_advantages(rewards: torch.Tensor, eps: float = ADV_EPS, equal_groups: str = "zero") -> torch.Tensor:
    """A_i = (r_i − mean(r)) / (std(r) + eps) for one group (G,) -> (G,). std is unbiased (n − 1), torch's default
    and the authors'. equal_groups "zero" (the paper's reading, the default): a group whose rewards are all equal
    carries no signal, A = 0 exactly. "float32" (the authors' code): the formula as float32 computes it, where the
    mean of equal rewards can be off by one ulp: six rewards of 3.1 give A ≈ −2.4e-3 each, not 0."""
    if equal_groups == "float32":
        r = rewards.float()
        return (r - r.mean()) / (r.std() + eps)  # (G,), no special case, as theirs
    A = (rewards - rewards.mean()) / (rewards.std() + eps)  # (G,)
    return torch.zeros_like(A) if bool((rewards == rewards[0]).all()) else A


def authors_rewards(parts: dict, gamma_v: float, gamma_t: float) -> torch.Tensor:
    """The rewards as the authors' trainer adds them up: their two reward functions, accuracy = α·r_ROUGE + γ_v·r_v
    + γ_t·r_t (Python floats) and format, each stored as float32, then summed in float32. (G,)"""
    acc = [a * r + gamma_v * v + gamma_t * t for a, r, v, t in zip(parts["alpha"], parts["rouge"], parts["video"],
                                                                   parts["text"])]
    per_func = torch.stack([torch.tensor(acc, dtype=torch.float32), torch.tensor(parts["format"], dtype=torch.float32)], 1)
    return per_func.sum(1)  # (G,)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref): exp(ref − logp) − (ref − logp) − 1 (≥ 0; Schulman 2020)."""
    x = (ref_logp - logp).clamp(-10.0, 10.0)  # (B, L); the authors' clamp keeps exp finite
    return x.exp() - x - 1  # (B, L)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, epsilon: float = EPSILON, beta: float = BETA,
              loss_avg: str = "sequence", n_seqs: int | None = None, n_tokens: int | None = None):
    """The clipped surrogate plus β·KL, masked and averaged. Returns (loss, stats of detached tensors).

    logp, old_logp, ref_logp: (B, L) per-token log-probs (ref_logp None when β = 0); advantages (B,); mask (B, L).
    n_seqs / n_tokens: the whole step's completions / tokens when a step's loss is summed over several calls
    (gradient accumulation); default: this call's. sequence: Σ_i (Σ_t ℓ_i,t / |o_i|) / n_seqs (the paper);
    token: Σ_i,t ℓ_i,t / n_tokens.
    """
    m = mask.float()  # (B, L)
    ratio = torch.exp(logp - old_logp)  # (B, L)  ρ = π_θ / π_old
    A = advantages[:, None]  # (B, 1)
    surrogate = torch.min(ratio * A, ratio.clamp(1 - epsilon, 1 + epsilon) * A)  # (B, L)  min(ρA, clip(ρ)A)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)  # (B, L)
    per_token = -(surrogate - beta * kl)  # (B, L)  ℓ_i,t
    lengths = m.sum(dim=1).clamp(min=1)  # (B,)  |o_i|
    if loss_avg == "sequence":
        loss = ((per_token * m).sum(dim=1) / lengths).sum() / (n_seqs or len(m))  # ()
    else:
        loss = (per_token * m).sum() / (n_tokens or m.sum())  # ()
    clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon) & (A > 0))  # (B, L): the clip cut the gradient
    stats = {"kl": ((kl * m).sum(dim=1) / lengths).detach(), "clipped": (clipped & mask.bool()).sum().detach()}
    return loss, stats
