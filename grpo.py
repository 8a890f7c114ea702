"""grpo.py: Safety-guided GRPO, stage 4 of VideoSafety-R1. Sample a group, score it, normalise, update.

For each prompt (video + query, both alarm tokens, the structured-output instruction) the policy samples
G completions <think>..</think><answer>..</answer><vidType>0|1</vidType><textType>0|1</textType>; rewards.py
scores them; the group's rewards become advantages; a clipped surrogate with a KL penalty updates the LLM:

    r_i    = r_format + α·r_ROUGE + γ_v·r_v + γ_t·r_t,   α = α_min + (1 − r_v·r_t)(α_max − α_min)   (DRA)
    A_i    = (r_i − mean(r)) / (std(r) + 1e-4)                                       over the group of G
    ρ_i,t  = π_θ(o_i,t | q, o_i,<t) / π_old(o_i,t | q, o_i,<t)
    KL_i,t = π_ref/π_θ − log(π_ref/π_θ) − 1                                          (k3 estimator, ≥ 0)
    L      = −1/G Σ_i 1/|o_i| Σ_t [ min(ρ_i,t·A_i, clip(ρ_i,t, 1−ε, 1+ε)·A_i) − β·KL_i,t ]

Starts from the cold-start checkpoint; a frozen copy of it is π_ref. Trains the LLM only: the alarm vectors,
ATC heads, vision encoder and projector stay frozen. With --passes 1 (the paper's setting) π_old = π_θ at
the update, so ρ = 1, the surrogate's value is mean(A) = 0 and the reported loss is ≈ β·KL: near zero
by design, not a bug (the gradient is still the policy gradient). --passes k reuses each rollout batch
for k optimizer steps; then ρ moves away from 1 and the clip matters.

Run (one process; CPU or one GPU; the defaults are the paper's values):
    python grpo.py --model runs/vsr1/cold_start --data vst_grpo.jsonl --out runs/vsr1/grpo --gradient-checkpointing
    python grpo.py --model runs/demo/cold_start --group-size 4 --max-completion-length 96 \
        --lr 2e-4 --passes 2 --epochs 3 --max-steps 30            # the demo on CPU (tiny model; a few minutes)

Where we depart from the authors' code (an old TRL GRPOTrainer fork, 8 GPUs × 1 prompt), and why:
- One process. --batch-size prompts per step (default 8 = their 8 GPUs × 1 prompt) are rolled out one group
  at a time and their losses accumulated before one optimizer step: the same objective, memory for G sequences.
- Weights stay fp32 with bf16 autocast on GPU (theirs: bf16 under DeepSpeed, which keeps fp32 master weights).
- The old-policy log-probs are recomputed by the training forward (no sampling warpers) and only when
  --passes > 1; with one pass π_old = π_θ.detach(), as in their code and TRL (the tests check both agree).
  Like theirs, log-probs are the model's at temperature 1 without the top-p cut: the ratio is π_θ/π_old, not
  a correction for the truncated sampler (the paper samples at temperature 1.0, top_p 0.95).
- A group whose rewards are all equal gets A = 0 exactly (theirs: 0/(0+1e-4), equal up to rounding); such groups
  are counted in the logs. std is the unbiased one (torch's default), as in their code.
- Rewards come from rewards.py (tag counting, multilingual ROUGE; see there). Their KL clamp
  (ref − logp clipped to [−10, 10] before exp) is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data as D
import model as M
import rewards as R
from at_sft import _epoch_order, open_log

ONE_PASS_NOTE = ("note: --passes 1, so the ratio is exactly 1 at the update and the loss is ≈ β·KL, near zero by "
                 "design (the gradient is still the policy gradient); watch the reward, not the loss")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-videollama3", help="start point: the cold-start checkpoint (e.g. runs/demo/cold_start); also the frozen KL reference")
    p.add_argument("--data", default=None, help="GRPO JSONL with structured targets and labels (default: the demo's grpo split, generated if absent)")
    p.add_argument("--out", default="runs/demo/grpo", help="output checkpoint directory (+ metrics.jsonl)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the prompts (paper: 1)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many rollout steps (0 = no cap)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step (authors: 8 GPUs x 1 prompt)")
    p.add_argument("--group-size", type=int, default=6, help="G, completions sampled per prompt (paper: 6; at least 2)")
    p.add_argument("--max-completion-length", type=int, default=768, help="max new tokens per completion (paper: 768)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (paper: 0.95)")
    p.add_argument("--passes", type=int, default=1, help="optimizer steps per rollout batch (paper: 1; >1 makes the clip matter)")
    p.add_argument("--epsilon", type=float, default=0.2, help="ε, clip range of the ratio (paper: 0.2)")
    p.add_argument("--beta", type=float, default=0.04, help="β, weight of the k3 KL to the reference (paper: 0.04; 0 = no reference model)")
    p.add_argument("--loss-avg", choices=("sequence", "token"), default="sequence", help="sequence: mean over each completion's tokens, then over completions (paper); token: mean over all tokens of the batch")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate of the LLM (paper: 1e-6)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (paper: 0.01)")
    p.add_argument("--max-grad-norm", type=float, default=5.0, help="gradient clipping norm (paper: 5)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="share of optimizer steps of linear warmup before cosine decay (paper: 0.03)")
    p.add_argument("--alpha-min", type=float, default=0.1, help="DRA: ROUGE weight when both labels are right (paper: 0.1)")
    p.add_argument("--alpha-max", type=float, default=0.5, help="DRA: ROUGE weight when a label is wrong (paper: 0.5)")
    p.add_argument("--gamma-v", type=float, default=1.0, help="γ_v, weight of the video-label reward (paper: 1.0)")
    p.add_argument("--gamma-t", type=float, default=1.0, help="γ_t, weight of the text-label reward (paper: 1.0)")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video (paper: 1)")
    p.add_argument("--max-frames", type=int, default=90, help="at most this many frames per video (paper: 90)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the update to save memory (generation keeps its KV cache)")
    p.add_argument("--seed", type=int, default=42, help="random seed (prompt order, sampling)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code (off by default)")
    args = p.parse_args(argv)
    if args.group_size < 2:
        p.error("--group-size must be at least 2: the advantage normalises by the group's std")
    args.data = args.data or D.demo_split("grpo")
    return args


# -----------------------------------------------------------------------------
# The pieces of GRPO, each a small pure function


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i − mean(r)) / (std(r) + eps) for one group (G,) -> (G,). std is unbiased (n − 1), torch's default
    and the authors'. A group whose rewards are all equal carries no signal: A = 0 exactly."""
    A = (rewards - rewards.mean()) / (rewards.std() + eps)  # (G,)
    return torch.zeros_like(A) if bool((rewards == rewards[0]).all()) else A


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref): exp(ref − logp) − (ref − logp) − 1 (≥ 0; Schulman 2020)."""
    x = (ref_logp - logp).clamp(-10.0, 10.0)  # (B, L); the authors' clamp keeps exp finite
    return x.exp() - x - 1  # (B, L)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, epsilon: float = 0.2, beta: float = 0.04,
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


@dataclass
class Group:
    """One prompt's rollout: everything the update needs, nothing it must recompute."""
    batch: dict  # the prompt batch: G copies of one record, left-padded (data.collate)
    completion: torch.Tensor  # (G, L) sampled ids, right-padded
    mask: torch.Tensor  # (G, L) up to and including the first end-of-turn token
    old_logp: torch.Tensor | None  # (G, L) log π_old at sampling time; None with one pass (then π_old = π_θ)
    ref_logp: torch.Tensor | None  # (G, L) log π_ref; None when β = 0
    rewards: torch.Tensor  # (G,)
    advantages: torch.Tensor  # (G,)
    parts: dict  # reward components, lists of G floats (format, rouge, video, text, alpha)
    texts: list  # decoded completions


@torch.no_grad()
def rollout(policy: M.VideoLLM, ref: M.VideoLLM | None, record: D.Record, args) -> Group:
    """Sample G completions for one prompt (eval mode, KV cache on), score them, normalise the rewards."""
    G = args.group_size
    batch = D.collate(policy, [record] * G, structured=True, with_target=False, fps=args.fps, max_frames=args.max_frames)
    with M.autocast(policy.device):
        completion, texts = M.generate(policy, batch, max_new_tokens=args.max_completion_length, do_sample=True,
                                       temperature=args.temperature, top_p=args.top_p)  # (G, L)
        mask = M.completion_mask(completion, policy.eot_id)  # (G, L)
        old_logp = M.completion_logprobs(policy, batch, completion, mask) if args.passes > 1 else None
        ref_logp = M.completion_logprobs(ref, batch, completion, mask) if ref is not None else None
    totals, parts = R.safety_rewards(texts, [record.target] * G, [record.video_label] * G, [record.text_label] * G,
                                     alpha_min=args.alpha_min, alpha_max=args.alpha_max,
                                     gamma_v=args.gamma_v, gamma_t=args.gamma_t)
    rewards = torch.tensor(totals, dtype=torch.float32, device=policy.device)  # (G,)
    return Group(batch, completion, mask, old_logp, ref_logp, rewards, group_advantages(rewards), parts, texts)


def update(policy: M.VideoLLM, groups: list[Group], optimizer, scheduler, params: list, args) -> dict:
    """args.passes optimizer steps on one rollout batch; each step's loss is accumulated over all groups."""
    n_seqs = sum(len(g.mask) for g in groups)
    n_tokens = int(sum(g.mask.sum() for g in groups))
    sums = defaultdict(float)
    for _ in range(args.passes):
        for g in groups:
            with M.autocast(policy.device):
                logp = M.completion_logprobs(policy, g.batch, g.completion, g.mask)  # (G, L), with grad
            old_logp = logp.detach() if g.old_logp is None else g.old_logp  # (G, L)
            loss, stats = grpo_loss(logp, old_logp, g.ref_logp, g.advantages, g.mask, epsilon=args.epsilon,
                                    beta=args.beta, loss_avg=args.loss_avg, n_seqs=n_seqs, n_tokens=n_tokens)
            loss.backward()
            sums["loss"] += loss.item() / args.passes
            sums["kl"] += float(stats["kl"].sum()) / (n_seqs * args.passes)
            sums["clip_frac"] += float(stats["clipped"]) / (n_tokens * args.passes)
        sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)) / args.passes
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return dict(sums)


def rollout_metrics(groups: list[Group]) -> dict:
    """Means over the step's completions: total reward, each component, format rate, label accuracies, length."""
    mean = lambda xs: sum(xs) / len(xs)
    out = {"reward": mean([float(r) for g in groups for r in g.rewards]),
           "reward_std": mean([float(g.rewards.std()) for g in groups]),  # within-group spread: the signal
           "zero_var_groups": mean([float(bool((g.advantages == 0).all())) for g in groups])}
    for part, name in (("format", "format_rate"), ("rouge", "rouge"), ("video", "video_acc"), ("text", "text_acc"), ("alpha", "alpha")):
        out[name] = mean([v for g in groups for v in g.parts[part]])
    out["completion_len"] = mean([float(n) for g in groups for n in g.mask.sum(dim=1)])
    return out


# -----------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    M.seed_everything(args.seed)
    load = dict(device=args.device, dtype=torch.float32, with_alarm=True, trust_remote_code=args.trust_remote_code)
    policy = M.load_model(args.model, **load)
    ref = None
    if args.beta > 0:  # π_ref: a frozen copy of the start point
        ref = M.load_model(args.model, **load)
        ref.model.eval().requires_grad_(False)
        if ref.alarm is not None:
            ref.alarm.requires_grad_(False)
    M.set_trainable(policy, train_llm=True, train_alarm=False, train_heads=False)  # LLM only
    if args.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable()
    policy.model.train()
    param_groups = M.param_groups(policy, args.lr, 0.0, 0.0, args.weight_decay)
    params = [p for g in param_groups for p in g["params"]]
    optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8)

    records = D.load_records(args.data)
    steps = math.ceil(len(records) * args.epochs / args.batch_size)
    steps = min(steps, args.max_steps) if args.max_steps else steps
    scheduler = M.cosine_schedule(optimizer, steps * args.passes, args.warmup_ratio)
    order = _epoch_order(len(records), steps * args.batch_size, args.seed)
    log = open_log(args.out)
    log({"config": vars(args)})
    print(f"GRPO: {len(records)} prompts from {args.data}; {steps} steps x {args.batch_size} prompts x "
          f"G={args.group_size}; model {args.model}; out {args.out}")
    if args.passes == 1:
        print(ONE_PASS_NOTE)

    bar = tqdm(range(steps), desc="grpo", dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        groups = [rollout(policy, ref, records[i], args) for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        t1, lr = time.time(), optimizer.param_groups[0]["lr"]  # the lr this step's first update uses
        stats = update(policy, groups, optimizer, scheduler, params, args)
        t2 = time.time()
        row = {"step": step + 1, "of": steps, **rollout_metrics(groups), **stats, "lr": lr,
               "s_rollout": t1 - t0, "s_update": t2 - t1, "sample": groups[0].texts[0][:200]}
        row = {k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in row.items()}  # 5 significant digits
        log(row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", fmt=f"{row['format_rate']:.2f}", kl=f"{row['kl']:.4f}",
                        zero_var=f"{row['zero_var_groups']:.2f}", len=f"{row['completion_len']:.0f}",
                        t=f"{row['s_rollout']:.1f}+{row['s_update']:.1f}s")

    summary = {"stage": "grpo", "steps": steps, "note": ONE_PASS_NOTE if args.passes == 1 else ""}
    log({"summary": summary})
    M.save_checkpoint(policy, args.out, meta={"stage": "grpo", "args": vars(args), "step": steps})
    print(json.dumps({k: v for k, v in summary.items() if k != "note"}))
    return summary


if __name__ == "__main__":
    main()
