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
ATC heads, vision encoder and projector stay frozen. At the end the heads' thresholds are refitted on the held-out
records (--eval-data, training.calibrate_atc; prompt forwards only, no generation): the LLM under them moved.
With --passes 1 (the paper's setting) π_old = π_θ at the update, so ρ = 1, the surrogate's value is mean(A) = 0 and the reported loss is ≈ β·KL: near zero
by design, not a bug (the gradient is still the policy gradient). --passes k reuses each rollout batch
for k optimizer steps; then ρ moves away from 1 and the clip matters.

Run (one process; CPU or one GPU; the defaults are the paper's values):
    python grpo.py --model runs/vsr1/cold_start --data vst_grpo.jsonl --out runs/vsr1/grpo --gradient-checkpointing
    python grpo.py --model runs/demo/cold_start --batch-size 4 --group-size 8 --max-completion-length 96 \
        --lr 2e-4 --passes 2 --epochs 12.5                        # the demo on CPU (run_all.sh's; ~4.5 minutes)

Run (8 GPUs, one node; policy and reference sharded with FSDP2; the same 8 prompts per step as one process):
    torchrun --nproc_per_node 8 grpo.py --model runs/vsr1/cold_start --data vst_grpo.jsonl --out runs/vsr1/grpo \
        --gradient-checkpointing
Under torchrun prompt k of a step goes to rank k % N with its whole group (--batch-size counts the prompts of all
processes and must be a multiple of N); each prompt's sampling is seeded by its position in the run, so the
completions, and hence the steps, are those of one process (up to rounding). Each rank samples with the whole
policy gathered (distributed.unsharded); the loss is normalised by the whole step's completions or tokens.

Where we depart from the authors' code (an old TRL GRPOTrainer fork, 8 GPUs × 1 prompt), and why:
- --batch-size prompts per step (default 8 = their 8 GPUs × 1 prompt) are rolled out together (per process: one
  decode loop for all its prompts' groups) and their losses accumulated, one group at a time, before one optimizer
  step: the same objective, memory for G sequences in the update.
- One prefill per prompt (its KV cache shared by the G samples) and one vision-encoder pass per group, reused by
  every update forward (rollout.py's fast path), where theirs repeats both G times per forward; same results.
- Weights stay fp32 with bf16 autocast on GPU (theirs: bf16 under DeepSpeed, which keeps fp32 master weights).
- The old-policy log-probs are recomputed by the training forward (no sampling warpers) and only when
  --passes > 1; with one pass π_old = π_θ.detach(), as in their code and TRL (the tests check both agree).
  Like theirs, log-probs are the model's at temperature 1 without the top-p cut: the ratio is π_θ/π_old, not
  a correction for the truncated sampler (the paper samples at temperature 1.0, top_p 0.95).
- A group whose rewards are all equal gets A = 0 exactly. Theirs computes the formula in float32 as it comes out: the
  mean of equal rewards can be one ulp off, so six rewards of 3.1 (the ceiling, frequent late in training) give
  A ≈ −2.4e-3 each, not 0 (`--recipe authors` reproduces it). Such groups are counted in the logs. std is the
  unbiased one (torch's default), as in their code.
- `--recipe authors` (recipe.py) also takes their prompt (no system turn; their QUESTION_TEMPLATE + TYPE_TEMPLATE
  after the query, the textual alarm after that), top-k 50 before top-p 0.95, and their visual budget (merge 8, at
  most 5000 visual tokens, VideoLLaMA3 processors).
- Rewards come from rewards.py (tag counting, multilingual ROUGE; see there). Their KL clamp
  (ref − logp clipped to [−10, 10] before exp) is kept.
- Opt-in `--lora` (the paper fine-tunes the whole LLM): only the policy gets adapters (lora.py), merged into the
  saved checkpoint; π_ref stays the frozen start checkpoint, loaded on its own as without --lora. One process only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm import tqdm

import cli
import data as D
import demo
import distributed
import lora
import model as M
import recipe as RC
import rewards as R
import rollout
import training as T
from grpo_loss import BETA, EPSILON, authors_rewards, group_advantages, grpo_loss

ONE_PASS_NOTE = ("note: --passes 1, so the ratio is exactly 1 at the update and the loss is ≈ β·KL, near zero by "
                 "design (the gradient is still the policy gradient); watch the reward, not the loss")


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="tiny-videollama3", help="start point: the cold-start checkpoint (e.g. "
                   "runs/demo/cold_start); also the frozen KL reference")
    g.add_argument("--data", default=None, help="GRPO JSONL with structured targets and labels (default: the demo's "
                   "grpo split, generated if absent)")
    cli.add_heldout_flags(g)
    g.add_argument("--out", default="runs/demo/grpo", help="output checkpoint directory (+ metrics.jsonl)")
    g = p.add_argument_group("rollout")
    g.add_argument("--batch-size", type=cli.positive_int, default=8,
                   help="prompts per step, all processes together (authors: 8 GPUs x 1 prompt)")
    g.add_argument("--group-size",
                   type=cli.number(int, low=2, what="an integer >= 2 (the advantage normalises by the group's std)"),
                   default=6, help="G, completions sampled per prompt (paper: 6; at least 2)")
    g.add_argument("--max-completion-length", type=cli.positive_int, default=M.MAX_NEW_TOKENS,
                   help="max new tokens per completion (paper: 768)")
    g.add_argument("--temperature", type=cli.positive_float, default=1.0, help="sampling temperature (paper: 1.0)")
    g.add_argument("--top-p", type=cli.probability, default=M.TOP_P, help="nucleus sampling (paper: 0.95)")
    g.add_argument("--top-k", type=cli.nonneg_int, default=None, help="keep the k most likely tokens before top-p (0 = "
                   "off, the paper's stated setting; with k the nucleus is found among k candidates, much cheaper; "
                   "default: the recipe's, paper 0, authors 50)")
    g = p.add_argument_group("reward (DRA)")
    g.add_argument("--alpha-min", type=cli.nonneg_float, default=R.ALPHA_MIN,
                   help="ROUGE weight when both labels are right (paper: 0.1)")
    g.add_argument("--alpha-max", type=cli.nonneg_float, default=R.ALPHA_MAX, help="ROUGE weight when a label is wrong "
                   "(paper: 0.5)")
    g.add_argument("--gamma-v", type=cli.nonneg_float, default=R.GAMMA_V, help="γ_v, weight of the video-label reward "
                   "(paper: 1.0)")
    g.add_argument("--gamma-t", type=cli.nonneg_float, default=R.GAMMA_T, help="γ_t, weight of the text-label reward "
                   "(paper: 1.0)")
    g = p.add_argument_group("loss")
    g.add_argument("--epsilon", type=cli.positive_float, default=EPSILON,
                   help="ε, clip range of the ratio (paper: 0.2)")
    g.add_argument("--beta", type=cli.nonneg_float, default=BETA,
                   help="β, weight of the k3 KL to the reference (paper: 0.04; 0 = no reference model)")
    g.add_argument("--loss-avg", choices=("sequence", "token"), default="sequence", help="sequence: mean over each "
                   "completion's tokens, then over completions (paper); token: mean over all tokens of the batch")
    g.add_argument("--passes", type=cli.positive_int, default=1,
                   help="optimizer steps per rollout batch (paper: 1; >1 makes the clip matter)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=cli.positive_float, default=1.0, help="passes over the prompts (paper: 1)")
    g.add_argument("--max-steps", type=cli.nonneg_int, default=0,
                   help="stop after this many rollout steps (0 = no cap)")
    g.add_argument("--lr", type=cli.nonneg_float, default=M.LR_LLM, help="AdamW learning rate of the LLM (paper: 1e-6)")
    g.add_argument("--weight-decay", type=cli.nonneg_float, default=0.01, help="AdamW weight decay (paper: 0.01)")
    g.add_argument("--max-grad-norm", type=cli.positive_float, default=5.0, help="gradient clipping norm (paper: 5)")
    g.add_argument("--warmup-ratio", type=cli.unit_float, default=T.WARMUP_RATIO,
                   help="share of optimizer steps of linear warmup before cosine decay (paper: 0.03)")
    RC.add_flag(p.add_argument_group("recipe"))
    cli.add_video_flags(p)
    cli.add_lora_flags(p)
    cli.add_snapshot_flags(p, resume_help="continue from OUT/resume: weights, optimizer, scheduler, RNG, step "
                           "(π_ref is reloaded from the --model the run started from)")
    cli.add_run_flags(p, seed=42, seed_help="random seed (prompt order, sampling)")
    args = p.parse_args(argv)
    if args.alpha_min > args.alpha_max:
        p.error(f"--alpha-min {args.alpha_min} is above --alpha-max {args.alpha_max}: DRA raises the ROUGE weight "
                "when a label is wrong")
    if args.top_k is None:
        args.top_k = RC.get(args.recipe).top_k
    demo.fill_splits(args, "grpo")  # the demo's splits where not given
    return args


# -----------------------------------------------------------------------------
# Rollout (one group per prompt) and update (one optimizer step per pass over the step's groups)


@dataclass
class Group:
    """One prompt's rollout: everything the update needs, nothing it must recompute."""
    batch: dict  # the prompt batch: G rows of one record sharing its video features (rollout.repeat_rows)
    completion: torch.Tensor  # (G, L) sampled ids, right-padded
    mask: torch.Tensor  # (G, L) up to and including the first end-of-turn token
    old_logp: torch.Tensor | None  # (G, L) log π_old at sampling time; None with one pass (then π_old = π_θ)
    ref_logp: torch.Tensor | None  # (G, L) log π_ref; None when β = 0
    rewards: torch.Tensor  # (G,)
    advantages: torch.Tensor  # (G,)
    parts: dict  # reward components, lists of G floats (format, rouge, video, text, alpha)
    texts: list  # decoded completions


@torch.no_grad()
def rollout_groups(policy: M.VideoLLM, ref: M.VideoLLM | None, records: list[D.Record], seeds: list[int], args,
                   skipped: dict) -> list[Group]:
    """Sample G completions for each prompt, score them, normalise each group's rewards. Each video is decoded,
    encoded and its prompt prefilled once, and all the prompts' groups decode together in one loop (rollout.py's
    fast path: the G samples of a prompt share its KV cache). seeds: one per prompt, its sampling generator's, so
    its completions are those of sampling it alone after torch.manual_seed(seed). A record whose video cannot be
    decoded (with --skip-bad-records) gives an empty group (`empty_group`), in its place."""
    G = args.group_size
    prompts = [D.collate(policy, [record], with_target=False, fps=args.fps, max_frames=args.max_frames,
                         skip_bad=args.skip_bad_records, skipped=skipped, max_new_tokens=args.max_completion_length,
                         **RC.prompt_kwargs(args.recipe, "grpo"))  # decoded once; too long for the model: bad input
               for record in records]
    ready = [i for i, p in enumerate(prompts) if p is not None]  # a skipped one is named in `skipped` and the log
    with T.autocast(policy.device):
        for i in ready:
            prompts[i] = rollout.encode_videos(policy, prompts[i])  # the frozen vision encoder: once per group, here
        generators = [torch.Generator(policy.device).manual_seed(seeds[i]) for i in ready]
        samples = rollout.sample_groups(policy, [prompts[i] for i in ready], G, max_new_tokens=args.max_completion_length,
                                        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                        generators=generators)  # one prefill per prompt, one decode loop for all
    sampled = dict(zip(ready, samples))
    return [score_group(policy, ref, record, prompts[i], *sampled[i], args) if i in sampled
            else empty_group(policy, ref, record, args) for i, record in enumerate(records)]


def score_group(policy: M.VideoLLM, ref: M.VideoLLM | None, record: D.Record, prompt: dict,
                completion: torch.Tensor, texts: list, args) -> Group:
    """One prompt's sampled group (completion (G, L)) made ready for the update: its mask, π_old's and π_ref's
    log-probs, rewards and advantages."""
    G = completion.shape[0]
    with T.autocast(policy.device):
        mask = M.completion_mask(completion, policy.eot_id)  # (G, L)
        batch = rollout.repeat_rows(prompt, G)  # G rows sharing the video features: no vision encoder in the update
        old_logp = M.completion_logprobs(policy, batch, completion, mask) if args.passes > 1 else None
        ref_logp = M.completion_logprobs(ref, batch, completion, mask) if ref is not None else None
    totals, parts = R.safety_rewards(texts, [record.target] * G, [record.video_label] * G, [record.text_label] * G,
                                     alpha_min=args.alpha_min, alpha_max=args.alpha_max,
                                     gamma_v=args.gamma_v, gamma_t=args.gamma_t)
    rc = RC.get(args.recipe)
    rewards = (authors_rewards(parts, args.gamma_v, args.gamma_t) if rc.equal_groups == "float32" else
               torch.tensor(totals, dtype=torch.float32)).to(policy.device)  # (G,)
    return Group(batch, completion, mask, old_logp, ref_logp, rewards,
                 group_advantages(rewards, equal_groups=rc.equal_groups), parts, texts)


def empty_group(policy: M.VideoLLM, ref: M.VideoLLM | None, record: D.Record, args) -> Group:
    """What a skipped prompt leaves: no completions, no rewards, weight 0 (it adds exactly 0 to the loss and the
    gradient, and nothing to the counts or metrics). It exists for torchrun, where every forward of a sharded model
    is a collective, so every rank must run as many of them (π_ref's here, the policy's in `update`): its forwards
    read an empty query (no video) and one masked-out token."""
    stand_in = dataclasses.replace(record, query="", video=None, image=None)  # the record may be too long to read
    batch = D.collate(policy, [stand_in], with_target=False, no_video=True, **RC.prompt_kwargs(args.recipe, "grpo"))
    completion = torch.full((1, 1), policy.eot_id, device=policy.device)  # (1, 1)
    mask = torch.zeros_like(completion, dtype=torch.bool)  # (1, 1): nothing counts
    with T.autocast(policy.device):
        ref_logp = M.completion_logprobs(ref, batch, completion, mask) if ref is not None else None
    old_logp = torch.zeros(1, 1, device=policy.device) if args.passes > 1 else None
    none = torch.zeros(0, device=policy.device)  # (0,)
    return Group(batch, completion, mask, old_logp, ref_logp, none, torch.zeros(1, device=policy.device),
                 {part: [] for part in R.PARTS}, [])


def update(policy: M.VideoLLM, groups: list[Group], optimizer, scheduler, params: list, args, step: int) -> dict:
    """args.passes optimizer steps on one rollout batch; each step's loss is accumulated over all groups.

    Under torchrun each rank holds its own groups: the loss is normalised by the whole step's completions / tokens
    (summed over ranks) and multiplied by the world size, since FSDP averages the ranks' gradients; so the step is
    the one-process step. A non-finite loss or gradient stops the run before the optimizer step."""
    world = distributed.world_size()
    counts = distributed.all_reduce_sum([sum(len(g.rewards) for g in groups), sum(int(g.mask.sum()) for g in groups)])
    n_seqs, n_tokens = (max(int(n), 1) for n in counts)  # the whole step's completions and tokens, all ranks
    sums = defaultdict(float)
    for _ in range(args.passes):
        loss_sum = kl_sum = n_clipped = 0.0
        for g in groups:
            with T.autocast(policy.device):
                logp = M.completion_logprobs(policy, g.batch, g.completion, g.mask)  # (G, L), with grad
            old_logp = logp.detach() if g.old_logp is None else g.old_logp  # (G, L)
            loss, stats = grpo_loss(logp, old_logp, g.ref_logp, g.advantages, g.mask, epsilon=args.epsilon,
                                    beta=args.beta, loss_avg=args.loss_avg, n_seqs=n_seqs, n_tokens=n_tokens)
            (loss * world).backward()  # FSDP averages the ranks' gradients: × world makes them their sum
            loss_sum += loss.item()
            kl_sum += float(stats["kl"].sum())  # Σ over completions of each one's mean KL
            n_clipped += float(stats["clipped"])
        loss_sum, kl_sum, n_clipped = distributed.all_reduce_sum([loss_sum, kl_sum, n_clipped])  # the step's, all ranks
        grad_norm = float(distributed.clip_grad_norm(params, args.max_grad_norm))
        T.check_finite(loss_sum, grad_norm, step, T.resume_dir(args.out))  # before NaN reaches the weights
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums["loss"] += loss_sum / args.passes
        sums["kl"] += kl_sum / (n_seqs * args.passes)
        sums["clip_frac"] += n_clipped / (n_tokens * args.passes)
        sums["grad_norm"] += grad_norm / args.passes
    return dict(sums)


def rollout_metrics(groups: list[Group]) -> dict:
    """Means over the step's completions (over its groups for reward_std and zero_var_groups), all ranks together:
    total reward, each component, format rate, label accuracies, length. Empty groups count nowhere."""
    groups = [g for g in groups if len(g.rewards)]
    each = lambda values_of: [v for g in groups for v in values_of(g)]  # one value per completion
    lists = {"reward": each(lambda g: g.rewards.tolist()),
             "reward_std": [float(g.rewards.std()) for g in groups],  # within-group spread: the signal
             "zero_var_groups": [float(bool((g.rewards == g.rewards[0]).all())) for g in groups]}  # all equal
    names = (("format", "format_rate"), ("rouge", "rouge"), ("video", "video_acc"), ("text", "text_acc"),
             ("alpha", "alpha"))
    for part, name in names:
        lists[name] = each(lambda g: g.parts[part])
    lists["completion_len"] = each(lambda g: g.mask.sum(dim=1).tolist())
    totals = distributed.all_reduce_sum([sum(v) for v in lists.values()] + [len(v) for v in lists.values()])
    return {name: total / max(n, 1) for name, total, n in zip(lists, totals, totals[len(lists):])}


# -----------------------------------------------------------------------------
# The run: config, init, data, model, optimizer, loop


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, _, device = distributed.init(args.device)  # (0, 1, 0, --device) without torchrun
    lora.check(args.lora, world)  # peft installed, one process: before any data or model is read
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} (prompts per step, all processes) must be a multiple of "
                         f"the {world} processes: each prompt's group stays on one process")
    T.seed_everything(args.seed)
    if not args.resume:  # a wrong --model fails here, not after the data are read
        M.check_model_path(args.model, "--model")
    T.take_out(args.out)
    skipped: dict = {}
    records = D.load_records(args.data, skip_bad=args.skip_bad_records, skipped=skipped, structured=True,
                             prompt_only=True)  # bad data fails fast; the reward reads structured targets
    heldout = D.load_records(args.eval_data)[:args.eval_records] if args.eval_records else []  # threshold fit
    resume = T.resume_point(args)
    if resume:
        skipped.update(resume["skipped"])  # those seen before the snapshot
        T.say(f"GRPO: resuming from {resume['dir']} (step {resume['step']}); π_ref from {resume['model']}")
    start_model = resume["model"] if resume else args.model  # π_ref: the run's start point, also after --resume

    load = dict(trust_remote_code=args.trust_remote_code)  # under torchrun: whole on CPU, then each rank its shard
    policy = T.load_for_training(resume["dir"] if resume else args.model, device, **load)
    T.apply_lora(policy, args, resume["dir"] if resume else None)  # --lora: the policy only, never π_ref
    if note := RC.check_start(M.checkpoint_meta(start_model), args.recipe, "GRPO"):
        T.say(note)
    ref = None
    if args.beta > 0:  # π_ref: a frozen copy of the start point
        ref = T.load_for_training(start_model, device, **load)
        ref.model.eval().requires_grad_(False)
        if ref.alarm is not None:
            ref.alarm.requires_grad_(False)
    M.set_trainable(policy, train_llm=True, train_alarm=False, train_heads=False)  # LLM only
    if world > 1:  # both sharded the same way: every rank runs π_ref's forward for as many groups
        distributed.shard_model(policy, device)
        if ref is not None:
            distributed.shard_model(ref, device)
    if args.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable()
    policy.model.train()
    param_groups = M.param_groups(policy, args.lr, 0.0, 0.0, args.weight_decay)
    params = [p for g in param_groups for p in g["params"]]
    optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8)

    steps = math.ceil(len(records) * args.epochs / args.batch_size)
    steps = min(steps, args.max_steps) if args.max_steps else steps
    scheduler = T.cosine_schedule(optimizer, steps * args.passes, args.warmup_ratio)
    order = D.run_order(len(records), steps * args.batch_size, args.seed)  # the data position is the step
    start = T.load_train_state(resume["dir"], optimizer, scheduler, policy)["step"] if resume else 0
    log = T.open_log(args.out, vars(args), resume=resume)
    T.say(f"GRPO: {len(records)} prompts from {args.data}; {steps} steps x {args.batch_size} prompts x "
          f"G={args.group_size}; model {args.model}; out {args.out}" + (f"; {world} processes" if world > 1 else ""))
    if args.passes == 1:
        T.say(ONE_PASS_NOTE)

    bar = tqdm(range(start, steps), desc="grpo", dynamic_ncols=True, initial=start, total=steps, disable=rank != 0)
    for step in bar:
        t0 = time.time()
        prompts = order[step * args.batch_size:(step + 1) * args.batch_size]
        mine = range(rank, args.batch_size, world)  # prompt k of the step: on rank k % world, whole group
        # seeded per prompt: the same samples under any world size, and after --resume
        seeds = [args.seed * 1_000_003 + step * args.batch_size + k for k in mine]
        with distributed.unsharded(policy):  # the whole policy on every rank: completions end at different lengths
            groups = rollout_groups(policy, ref, [records[prompts[k]] for k in mine], seeds, args, skipped)
        t1, lr = time.time(), optimizer.param_groups[0]["lr"]  # the lr this step's first update uses
        stats = update(policy, groups, optimizer, scheduler, params, args, step + 1)
        t2 = time.time()
        sample = next((t for g in groups for t in g.texts), "")  # rank 0's first completion
        row = {"step": step + 1, "of": steps, **rollout_metrics(groups), **stats, "lr": lr,
               "s_rollout": t1 - t0, "s_update": t2 - t1, "sample": sample[:200]}
        row = {k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in row.items()}  # 5 significant digits
        log(row)
        if T.snapshot_due(step + 1, steps, args.save_every):
            state = {"step": step + 1, "model": start_model, "skipped": distributed.union_over_ranks(skipped)}
            T.save_train_state(T.resume_dir(args.out), policy, optimizer, scheduler, state)
        bar.set_postfix(reward=f"{row['reward']:.3f}", fmt=f"{row['format_rate']:.2f}", kl=f"{row['kl']:.4f}",
                        zero_var=f"{row['zero_var_groups']:.2f}", len=f"{row['completion_len']:.0f}",
                        t=f"{row['s_rollout']:.1f}+{row['s_update']:.1f}s")

    summary = {"stage": "grpo", "steps": steps, "note": ONE_PASS_NOTE if args.passes == 1 else ""}
    if policy.alarm is not None:  # the frozen heads read a moved LLM: refit their thresholds on held-out prompts
        summary.update(heldout_n=len(heldout), **T.calibrate_atc(
            policy, heldout, stage="grpo", prompt=RC.prompt_kwargs(args.recipe, "grpo"), batch_size=args.batch_size,
            fps=args.fps, max_frames=args.max_frames))
    return T.finish(policy, args.out, vars(args), log, skipped, summary)  # logs it (skipped records by name), saves OUT


if __name__ == "__main__":
    cli.run_cli(main)
