"""sft.py: the supervised fine-tuning loop shared by AT-SFT (at_sft.py, stage 1) and cold start (cold_start.py,
stage 3), so that neither stage imports the other.

- `get_args`: the SFT stages' flags (each stage passes its name, docstring and defaults);
- `start`: load the model (alarm tokens on), the records and the held-out split, shard under torchrun, open the log;
- `train_sft`: one supervised phase: L = L_base (+ λ1·L_ATC^v + λ2·L_ATC^t with use_atc), with the parts that train;
- `heldout_check`: the ATC heads' accuracy and refitted thresholds on held-out records, and the greedy format rate.

The alarm tokens, the ATC heads and the loss are in alarm.py; the model plumbing in model.py; snapshots, logs and
the schedule in training.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch
from tqdm import tqdm

import cli
import data as D
import demo
import distributed
import lora
import model as M
import recipe as RC
import training as T
from alarm import LAMBDA_T, LAMBDA_V, at_sft_loss


def get_args(argv=None, stage: str = "at_sft", doc: str | None = None, **defaults):
    """The SFT stages' flags (each stage passes its name, its docstring for --help and its defaults; the AT-SFT-only
    flags are hidden from cold start's --help). Defaults are the paper's values."""
    p = cli.parser(doc or __doc__)
    atc_only = (lambda h: h) if stage == "at_sft" else (lambda h: argparse.SUPPRESS)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="tiny-videollama3", help="hub name, local path, previous stage's checkpoint, or "
                   f"a built-in tiny model ({', '.join(demo.TINY_MODELS)})")
    g.add_argument("--data", default=None, help=f"training JSONL (default: the demo's {stage} split, generated if "
                   "absent)")
    cli.add_heldout_flags(g)
    g.add_argument("--out", default=f"runs/demo/{stage}", help="output checkpoint directory (+ metrics.jsonl)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=cli.positive_float, default=1.0, help="passes over the data (paper: 1)")
    g.add_argument("--max-steps", type=cli.nonneg_int, default=0,
                   help="stop after this many optimizer steps (0 = no cap)")
    g.add_argument("--batch-size", type=cli.positive_int, default=4, help="records per micro-batch")
    g.add_argument("--grad-accum", type=cli.positive_int, default=32, help="micro-batches per optimizer step in each "
                   "process (global batch = batch-size x grad-accum x processes; paper: 128)")
    g.add_argument("--lr-llm", type=cli.nonneg_float, default=M.LR_LLM,
                   help="learning rate of the language model (paper: 1e-6)")
    g.add_argument("--lr-alarm", type=cli.nonneg_float, default=M.LR_ALARM, help=atc_only("learning rate of the alarm vectors "
                   "(paper: 1e-5)"))
    g.add_argument("--lr-heads", type=cli.nonneg_float, default=M.LR_HEADS, help=atc_only("learning rate of the ATC heads "
                   "(paper: 1e-5)"))
    g.add_argument("--weight-decay", type=cli.nonneg_float, default=0.0, help="AdamW weight decay (paper: 0)")
    g.add_argument("--warmup-ratio", type=cli.unit_float, default=T.WARMUP_RATIO,
                   help="share of steps of linear warmup before cosine decay (paper: 0.03)")
    g.add_argument("--max-grad-norm", type=cli.positive_float, default=1.0, help="gradient clipping norm")
    g = p.add_argument_group("AT-SFT loss" if stage == "at_sft" else None)
    g.add_argument("--lambda-v", type=cli.nonneg_float, default=LAMBDA_V, help=atc_only("λ1, weight of the video ATC loss "
                   "(paper: 0.1)"))
    g.add_argument("--lambda-t", type=cli.nonneg_float, default=LAMBDA_T, help=atc_only("λ2, weight of the text ATC loss "
                   "(paper: 0.1)"))
    g.add_argument("--two-phase", action="store_true", help=atc_only(
        "the authors' recipe: phase 1 = LM loss only on LLM + alarm vectors, then phase 2 = the full AT-SFT loss on "
        "LLM + alarm + ATC heads (default: the paper's single objective)"))
    RC.add_flag(p.add_argument_group("recipe"), help_extra=atc_only("; on AT-SFT it also implies --two-phase (their "
                "stages 1 and 2)"))
    cli.add_video_flags(p)
    cli.add_lora_flags(p)
    cli.add_snapshot_flags(p, resume_help="continue from OUT/resume: weights, optimizer, scheduler, RNG, data position")
    cli.add_run_flags(p, seed=42, seed_help="random seed (same seed, same machine: same weights)")
    p.set_defaults(**defaults)
    args = p.parse_args(argv)
    if stage == "at_sft" and args.recipe == "authors":
        args.two_phase = True  # their stage 1 (alarm init) then stage 2, as two runs of train.py
    demo.fill_splits(args, stage)  # the demo's splits where not given
    return args


# -----------------------------------------------------------------------------
# One SFT phase: the loop shared by AT-SFT and cold start


def train_sft(llm: M.VideoLLM, args, records: list, *, phase: str, prompt: dict, use_atc: bool,
              train_alarm: bool, train_heads: bool, log, skipped: dict, resume: dict | None = None) -> int:
    """Run one supervised phase over `records`; return the number of optimizer steps taken.

    prompt: the stage's prompt settings (recipe.prompt_kwargs), passed to data.collate. Under --recipe authors the
    loss is their step-normalised sum: each micro-batch backpropagates Σ CE + λ·BCE and the step's gradients are then
    divided by N_step, its label tokens (+4 per record with alarm tokens: their labels tensor carries 4 alarm entries
    per sample, which HF's count includes); under torchrun N_step is summed over the ranks (HF's
    average_tokens_across_devices; theirs, an older HF, divides by each rank's own count).

    resume: {"dir", "phase", "step"} of a snapshot to continue from (ignored if it belongs to another phase).

    Under torchrun (llm sharded by distributed.shard_model) each rank runs --grad-accum micro-batches per step: the
    global batch is batch_size × grad_accum × world, and micro-batch m of a step in one process with grad_accum × world
    is rank r's local micro-batch j with m = j·world + r. Each rank's loss is divided by grad_accum and FSDP
    averages the gradients over ranks, so a step equals that one-process step."""
    rank, world = distributed.rank(), distributed.world_size()
    norm = RC.get(args.recipe).sft_loss
    M.set_trainable(llm, train_llm=True, train_alarm=train_alarm, train_heads=train_heads)
    groups = M.param_groups(llm, args.lr_llm, args.lr_alarm, args.lr_heads, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    global_batch = args.batch_size * args.grad_accum * world
    total = math.ceil(len(records) * args.epochs / global_batch)
    if args.max_steps:
        total = min(total, args.max_steps)
    scheduler = T.cosine_schedule(optimizer, total, args.warmup_ratio)
    order = D.run_order(len(records), total * global_batch, args.seed)  # the data position is the step
    start, resume_dir = 0, T.resume_dir(args.out)
    if resume and resume["phase"] == phase:
        start = T.load_train_state(resume["dir"], optimizer, scheduler, llm)["step"]
    llm.model.train()
    bar = tqdm(range(start, total), desc=phase, dynamic_ncols=True, initial=start, total=total, disable=rank != 0)
    for step in bar:
        t0, n_tokens, n_step, sums = time.time(), 0, 0, {"loss": 0.0}
        hits_v = hits_t = seen = 0
        for micro in range(args.grad_accum):
            lo = ((step * args.grad_accum + micro) * world + rank) * args.batch_size  # this rank's share
            batch_records = [records[i] for i in order[lo:lo + args.batch_size]]
            batch = D.collate(llm, batch_records, with_target=True, fps=args.fps, max_frames=args.max_frames,
                              skip_bad=args.skip_bad_records, skipped=skipped, **prompt)
            if batch is None:  # every record of this micro-batch was bad and skipped
                if world > 1:  # every forward / backward of a sharded model is a collective: the others wait
                    _stand_in(llm, batch_records[0], prompt)
                continue
            with T.autocast(llm.device):
                out = llm.forward(batch)
            if use_atc:  # L = L_base + λ1·L_ATC^v + λ2·L_ATC^t (authors: (Σ CE + λ·BCE) / N_step, see above)
                loss, parts = at_sft_loss(out["lm_loss"], out["logit_v"], out["logit_t"], batch["video_label"],
                                          batch["text_label"], args.lambda_v, args.lambda_t, norm=norm,
                                          n_tokens=out["n_tokens"])
                hits_v += int(((out["logit_v"] > 0).float() == batch["video_label"]).sum())
                hits_t += int(((out["logit_t"] > 0).float() == batch["text_label"]).sum())
            else:  # L = L_base (authors: Σ CE / N_step)
                loss = out["lm_loss"] * (out["n_tokens"] if norm == "step_sum" else 1)
                parts = {"lm": out["lm_loss"].detach()}
            (loss if norm == "step_sum" else loss / args.grad_accum).backward()
            n_step += int((batch["labels"] != -100).sum()) + (4 * len(batch["records"]) if llm.alarm is not None else 0)
            sums["loss"] += float(loss.detach()) / (1 if norm == "step_sum" else args.grad_accum)
            for k, v in parts.items():  # lm, and atc_v / atc_t when the ATC loss is on
                sums[k] = sums.get(k, 0.0) + float(v) / args.grad_accum
            n_tokens += int(batch["attention_mask"].sum())
            seen += len(batch["records"])
        distributed.all_reduce_alarm_grads(llm)  # replicated alarm: average its gradients (FSDP did the rest)
        if norm == "step_sum":  # ∇(S / N_step) = ∇S / N_step; FSDP averaged over ranks, so × world / ΣN
            n_all = distributed.all_reduce_sum([n_step])[0] if world > 1 else n_step
            for p in (p for g in groups for p in g["params"]):
                if p.grad is not None:
                    p.grad.mul_(world / max(n_all, 1))
            sums["loss"] *= world / max(n_all, 1)  # the step's loss S / N_step, as their Trainer logs it
        if world > 1:  # the step's numbers over the global batch: mean of the ranks' losses, summed counts
            keys = ["loss", "lm"] + (["atc_v", "atc_t"] if use_atc else [])  # the same on every rank
            counts = [n_tokens, hits_v, hits_t, seen]
            reduced = distributed.all_reduce_sum([sums.get(k, 0.0) for k in keys] + counts)
            *values, n_tokens, hits_v, hits_t, seen = reduced
            sums = {k: v / world for k, v in zip(keys, values)}
        grad_norm = distributed.clip_grad_norm([p for g in groups for p in g["params"]], args.max_grad_norm)
        T.check_finite(sums["loss"], grad_norm, step + 1, resume_dir)  # stop before a NaN reaches the weights
        lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}  # the rates this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"phase": phase, "step": step + 1, "of": total, **{k: round(v, 5) for k, v in sums.items()},
               "grad_norm": round(float(grad_norm), 4), "tok_per_s": round(n_tokens / (time.time() - t0), 1),
               **lrs}
        if use_atc:
            row.update(atc_v_acc=round(hits_v / max(seen, 1), 4), atc_t_acc=round(hits_t / max(seen, 1), 4))
        log(row)
        if T.snapshot_due(step + 1, total, args.save_every):
            T.save_train_state(resume_dir, llm, optimizer, scheduler, {"phase": phase, "step": step + 1})
        atc = {"acc_v": row["atc_v_acc"], "acc_t": row["atc_t_acc"]} if use_atc else {}
        bar.set_postfix(loss=f"{row['loss']:.3f}", **atc)
    return total


def _stand_in(llm: M.VideoLLM, record, prompt: dict) -> None:
    """Under torchrun, what a rank runs for a micro-batch whose records were all skipped: a forward and backward
    that add exactly 0 to every gradient (a short text, loss × 0: the record itself may be too long to read), so
    that it takes part in FSDP's collectives like the other ranks. One process simply skips the micro-batch; the
    step is the same."""
    stand_in = dataclasses.replace(record, query="", target="", video=None, image=None, turns=None)  # any text
    batch = D.collate(llm, [stand_in], with_target=True, no_video=True, **prompt)
    with T.autocast(llm.device):
        (llm.forward(batch)["lm_loss"] * 0).backward()


@torch.no_grad()
def heldout_check(llm: M.VideoLLM, records: list, args, *, stage: str, prompt: dict, n_generate: int = 0) -> dict:
    """On held-out records: fit the ATC heads' thresholds (training.calibrate_atc: set on llm.alarm, saved with the
    heads; accuracy at 0.5 and at the fitted threshold, AUROC) when the model has heads, and the format rate of
    greedy answers on the first `n_generate` of them (prompt: the stage's prompt settings, recipe.prompt_kwargs).
    No records: the thresholds fall back to 0.5 and say why.

    Under torchrun every rank takes every world-th batch with the whole model gathered (distributed.unsharded: greedy
    answers end at different lengths on different ranks), and the counts are summed over ranks."""
    rank, world = distributed.rank(), distributed.world_size()
    result, bs = {"heldout_n": len(records)}, args.batch_size
    if llm.alarm is not None:
        result.update(T.calibrate_atc(llm, records, stage=stage, prompt=prompt, batch_size=bs, fps=args.fps,
                                      max_frames=args.max_frames))
    if n_generate:
        from rewards import format_reward

        texts = []
        with distributed.unsharded(llm):
            for i in range(rank * bs, n_generate, bs * world):
                new = getattr(args, "max_new_tokens", 256)
                batch = D.collate(llm, records[i:min(i + bs, n_generate)], with_target=False, fps=args.fps,
                                  max_frames=args.max_frames, max_new_tokens=new, **prompt)
                texts += M.generate(llm, batch, max_new_tokens=new)[1]
        n_format, n_texts = distributed.all_reduce_sum([sum(map(format_reward, texts)), len(texts)])
        result["heldout_format_rate"] = round(n_format / n_texts, 4)
        result["heldout_example"] = texts[0][:300] if texts else ""  # rank 0 holds the first answer
    return result


# -----------------------------------------------------------------------------


def start(args, stage: str, structured: bool = False):
    """Read the records (training and held-out: bad data fails here, before minutes of model loading), then load
    the model (or, with --resume, the last snapshot) and open the log for a stage. structured: the training
    targets must be in the structured format (cold start).
    Under torchrun: join the process group and shard the model over the ranks (distributed.shard_model)."""
    rank, world, _, device = distributed.init(args.device)
    lora.check(args.lora, world)  # peft installed, one process: before any data or model is read
    if not args.resume:  # a wrong --model fails here, not after the data are read
        M.check_model_path(args.model, "--model")
    T.take_out(args.out)
    skipped: dict = {}
    records = D.load_records(args.data, skip_bad=args.skip_bad_records, skipped=skipped,
                             structured=structured)  # cold start trains on structured targets
    heldout = D.load_records(args.eval_data)[:args.eval_records] if args.eval_records else []
    resume = T.resume_point(args)
    if resume:
        T.say(f"{stage}: resuming from {resume['dir']} (phase {resume['phase']}, step {resume['step']})")
    llm = T.load_for_training(resume["dir"] if resume else args.model, device, trust_remote_code=args.trust_remote_code)
    T.apply_lora(llm, args, resume["dir"] if resume else None)  # --lora only
    if note := RC.check_start(M.checkpoint_meta(args.model), args.recipe, stage):
        T.say(note)
    if args.gradient_checkpointing:
        llm.model.gradient_checkpointing_enable()
    if world > 1:  # loaded whole on CPU by every rank; fully_shard moves each rank's shard to its device
        distributed.shard_model(llm, device)
    log = T.open_log(args.out, vars(args), resume=resume)
    T.say(f"{stage}: {len(records)} records from {args.data}; model {args.model}; out {args.out}"
          + (f"; {world} processes, global batch {args.batch_size * args.grad_accum * world}" if world > 1 else ""))
    return llm, records, heldout, log, skipped, resume
