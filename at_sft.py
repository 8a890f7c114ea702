"""at_sft.py: Alarm Token-guided Safety Fine-Tuning (AT-SFT).

The first design of VideoSafety-R1. Two alarm tokens are put in every prompt (<|visual_alarm|> after the
video, <|textual_alarm|> after the query); their embeddings are learnable vectors, and one ATC head per
modality reads the last-layer hidden state at its alarm token and says "harmful or safe". Training uses

    L = L_base + λ1·L_ATC^v + λ2·L_ATC^t          (λ1 = λ2 = 0.1; L_ATC = binary cross-entropy)

on the AT-SFT split (plain answers), with the vision encoder and projector frozen.

Run (one process; CPU or one GPU):
    python at_sft.py                                              # built-in tiny model on the demo data
    python at_sft.py --model lkhl/VideoLLaMA3-2B-Image-HF --data vst_at_sft.jsonl --out runs/vsr1/at_sft \
        --batch-size 4 --grad-accum 32 --gradient-checkpointing

Run (8 GPUs, one node; the model is sharded with FSDP2, the data split over the processes; the same global
batch of 4 × 4 × 8 = 128 gives the same steps as one process with --grad-accum 32):
    torchrun --nproc_per_node 8 at_sft.py --model lkhl/VideoLLaMA3-2B-Image-HF --data vst_at_sft.jsonl \
        --out runs/vsr1/at_sft --batch-size 4 --grad-accum 4 --gradient-checkpointing

Where we depart from the authors' code, and why:
- They train in two runs: stage 1 "alarm init" (LM loss only, LLM + alarm vectors) and stage 2 (the full
  loss, + heads). The paper describes the single objective above. Default: the single objective;
  `--two-phase` runs the authors' recipe (phase 1 then phase 2, one epoch budget each) in one command.
- Weights are kept in fp32 with bf16 autocast on GPU (the authors train bf16 weights under DeepSpeed,
  which also keeps fp32 master weights); on CPU everything is fp32.
- The LM loss is a token mean over the micro-batch's assistant tokens, divided by --grad-accum.

cold_start.py reuses the loop below (`train_sft`) with its own data and settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from tqdm import tqdm

import data as D
import model as M


def get_args(argv=None, stage: str = "at_sft", **defaults) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if stage == "at_sft" else defaults.pop("description"),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-videollama3",
                   help="hub name, local path, previous stage's checkpoint, or a built-in tiny model "
                        f"({', '.join(M.TINY_MODELS)})")
    p.add_argument("--data", default=None, help=f"training JSONL (default: the demo's {stage} split, generated if absent)")
    p.add_argument("--eval-data", default=None, help="held-out JSONL for the end-of-run check (default: the demo's eval split)")
    p.add_argument("--out", default=f"runs/demo/{stage}", help="output checkpoint directory (+ metrics.jsonl)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (paper: 1)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0 = no cap)")
    p.add_argument("--batch-size", type=int, default=4, help="records per micro-batch")
    p.add_argument("--grad-accum", type=int, default=32,
                   help="micro-batches per optimizer step in each process (global batch = batch-size x grad-accum x "
                        "processes; paper: 128)")
    p.add_argument("--lr-llm", type=float, default=1e-6, help="learning rate of the language model (paper: 1e-6)")
    atc_only = (lambda h: h) if stage == "at_sft" else (lambda h: argparse.SUPPRESS)  # hidden in cold start's --help
    p.add_argument("--lr-alarm", type=float, default=1e-5, help=atc_only("learning rate of the alarm vectors (paper: 1e-5)"))
    p.add_argument("--lr-heads", type=float, default=1e-5, help=atc_only("learning rate of the ATC heads (paper: 1e-5)"))
    p.add_argument("--lambda-v", type=float, default=0.1, help=atc_only("λ1, weight of the video ATC loss"))
    p.add_argument("--lambda-t", type=float, default=0.1, help=atc_only("λ2, weight of the text ATC loss"))
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: 0)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="share of steps of linear warmup before cosine decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video (paper: 1)")
    p.add_argument("--max-frames", type=int, default=90, help="at most this many frames per video (paper: 90)")
    p.add_argument("--two-phase", action="store_true",
                   help=atc_only("the authors' recipe: phase 1 = LM loss only on LLM + alarm vectors, then phase 2 = "
                                 "the full AT-SFT loss on LLM + alarm + ATC heads (default: the paper's single objective)"))
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--eval-records", type=int, default=60, help="held-out records for the end-of-run check (0 = skip)")
    p.add_argument("--seed", type=int, default=42, help="random seed (same seed, same machine: same weights)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code (off by default)")
    p.add_argument("--save-every", type=int, default=50, help="write a resumable snapshot to OUT/resume every N steps (0 = only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/resume: weights, optimizer, scheduler, RNG, data position")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="leave out (and name in the log) records with bad fields or undecodable videos instead of stopping")
    p.add_argument("--debug", action="store_true", help="show the Python traceback on bad input instead of one line")
    p.set_defaults(**defaults)
    args = p.parse_args(argv)
    args.data = args.data or D.demo_split(stage)
    args.eval_data = args.eval_data or D.demo_split("eval")
    return args


# -----------------------------------------------------------------------------
# One SFT phase: the loop shared by AT-SFT and cold start


def train_sft(llm: M.VideoLLM, args, records: list, *, phase: str, structured: bool, use_atc: bool,
              train_alarm: bool, train_heads: bool, log, skipped: dict, resume: dict | None = None) -> int:
    """Run one supervised phase over `records`; return the number of optimizer steps taken.

    resume: {"dir", "phase", "step"} of a snapshot to continue from (ignored if it belongs to another phase).

    Under torchrun (llm sharded by M.shard_model) each rank runs --grad-accum micro-batches per step: the global
    batch is batch_size × grad_accum × world, and micro-batch m of a step in one process with grad_accum × world
    is rank r's local micro-batch j with m = j·world + r. Each rank's loss is divided by grad_accum and FSDP
    averages the gradients over ranks, so a step equals that one-process step."""
    rank, world = M.dist_rank(), M.dist_world()
    M.set_trainable(llm, train_llm=True, train_alarm=train_alarm, train_heads=train_heads)
    groups = M.param_groups(llm, args.lr_llm, args.lr_alarm, args.lr_heads, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    global_batch = args.batch_size * args.grad_accum * world
    total = math.ceil(len(records) * args.epochs / global_batch)
    if args.max_steps:
        total = min(total, args.max_steps)
    scheduler = M.cosine_schedule(optimizer, total, args.warmup_ratio)
    order = D.run_order(len(records), total * global_batch, args.seed)  # the data position is the step
    start, resume_dir = 0, os.path.join(args.out, "resume")
    if resume and resume["phase"] == phase:
        start = M.load_train_state(resume["dir"], optimizer, scheduler, llm)["step"]
    llm.model.train()
    bar = tqdm(range(start, total), desc=phase, dynamic_ncols=True, initial=start, total=total, disable=rank != 0)
    for step in bar:
        t0, n_tokens, sums = time.time(), 0, {"loss": 0.0}
        hits_v = hits_t = seen = 0
        for micro in range(args.grad_accum):
            lo = ((step * args.grad_accum + micro) * world + rank) * args.batch_size  # this rank's share
            batch_records = [records[i] for i in order[lo:lo + args.batch_size]]
            batch = D.collate(llm, batch_records, structured=structured, with_target=True, fps=args.fps,
                              max_frames=args.max_frames, skip_bad=args.skip_bad_records, skipped=skipped)
            if batch is None:  # every record of this micro-batch was bad and skipped
                if world > 1:  # every forward / backward of a sharded model is a collective: the others wait
                    _stand_in(llm, batch_records[0], structured)
                continue
            with M.autocast(llm.device):
                out = llm.forward(batch)
            if use_atc:  # L = L_base + λ1·L_ATC^v + λ2·L_ATC^t
                loss, parts = M.at_sft_loss(out["lm_loss"], out["logit_v"], out["logit_t"], batch["video_label"],
                                            batch["text_label"], args.lambda_v, args.lambda_t)
                hits_v += int(((out["logit_v"] > 0).float() == batch["video_label"]).sum())
                hits_t += int(((out["logit_t"] > 0).float() == batch["text_label"]).sum())
            else:  # L = L_base
                loss, parts = out["lm_loss"], {"lm": out["lm_loss"].detach()}
            (loss / args.grad_accum).backward()
            sums["loss"] += float(loss.detach()) / args.grad_accum
            for k, v in parts.items():  # lm, and atc_v / atc_t when the ATC loss is on
                sums[k] = sums.get(k, 0.0) + float(v) / args.grad_accum
            n_tokens += int(batch["attention_mask"].sum())
            seen += len(batch["records"])
        M.all_reduce_alarm_grads(llm)  # replicated alarm: average its gradients (FSDP did the rest)
        if world > 1:  # the step's numbers over the global batch: mean of the ranks' losses, summed counts
            keys = ["loss", "lm"] + (["atc_v", "atc_t"] if use_atc else [])  # the same on every rank
            counts = [n_tokens, hits_v, hits_t, seen]
            *values, n_tokens, hits_v, hits_t, seen = M.all_reduce_sum([sums.get(k, 0.0) for k in keys] + counts)
            sums = {k: v / world for k, v in zip(keys, values)}
        grad_norm = M.clip_grad_norm([p for g in groups for p in g["params"]], args.max_grad_norm)
        M.check_finite(sums["loss"], grad_norm, step + 1, resume_dir)  # stop before a NaN reaches the weights
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
        if step + 1 == total or (args.save_every and (step + 1) % args.save_every == 0):
            M.save_train_state(resume_dir, llm, optimizer, scheduler, {"phase": phase, "step": step + 1})
        bar.set_postfix(loss=f"{row['loss']:.3f}", **({"acc_v": row["atc_v_acc"], "acc_t": row["atc_t_acc"]} if use_atc else {}))
    return total


def _stand_in(llm: M.VideoLLM, record, structured: bool) -> None:
    """Under torchrun, what a rank runs for a micro-batch whose records were all skipped: a forward and backward
    that add exactly 0 to every gradient (the record's text alone, loss × 0), so that it takes part in FSDP's
    collectives like the other ranks. One process simply skips the micro-batch; the step is the same."""
    batch = D.collate(llm, [record], structured=structured, with_target=True, no_video=True)
    with M.autocast(llm.device):
        (llm.forward(batch)["lm_loss"] * 0).backward()


@torch.no_grad()
def heldout_check(llm: M.VideoLLM, records: list, args, *, structured: bool, n_generate: int = 0) -> dict:
    """ATC accuracy on held-out records (when the model has heads) and, for structured prompts, the format
    rate of greedy answers on the first `n_generate` of them.

    Under torchrun every rank takes every world-th batch with the whole model gathered (M.unsharded: greedy
    answers end at different lengths on different ranks), and the counts are summed over ranks."""
    rank, world = M.dist_rank(), M.dist_world()
    llm.model.eval()
    result, hits_v, hits_t = {"heldout_n": len(records)}, 0, 0
    bs = args.batch_size
    with M.unsharded(llm):
        for i in range(rank * bs, len(records), bs * world):
            chunk = records[i:i + bs]
            batch = D.collate(llm, chunk, structured=structured, with_target=False, fps=args.fps, max_frames=args.max_frames)
            out = llm.forward(batch, need_lm=False)
            if out["logit_v"] is not None:
                hits_v += int(((out["logit_v"] > 0).float() == batch["video_label"]).sum())
                hits_t += int(((out["logit_t"] > 0).float() == batch["text_label"]).sum())
        texts = []
        if structured and n_generate:
            for i in range(rank * bs, n_generate, bs * world):
                batch = D.collate(llm, records[i:min(i + bs, n_generate)], structured=True, with_target=False,
                                  fps=args.fps, max_frames=args.max_frames)
                texts += M.generate(llm, batch, max_new_tokens=getattr(args, "max_new_tokens", 256))[1]
    if llm.alarm is not None:
        hits_v, hits_t = M.all_reduce_sum([hits_v, hits_t])
        result.update(heldout_atc_v_acc=round(hits_v / len(records), 4), heldout_atc_t_acc=round(hits_t / len(records), 4))
    if structured and n_generate:
        from rewards import format_reward

        n_format, n_texts = M.all_reduce_sum([sum(map(format_reward, texts)), len(texts)])
        result["heldout_format_rate"] = round(n_format / n_texts, 4)
        result["heldout_example"] = texts[0][:300] if texts else ""  # rank 0 holds the first answer
    llm.model.train()
    return result


def open_log(out_dir: str, append: bool = False):
    """JSONL logger for OUT/metrics.jsonl (appended to when a run resumes). Only rank 0 writes."""
    if M.dist_rank() != 0:
        return lambda row: None
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, "metrics.jsonl"), "a" if append else "w")

    def log(row: dict) -> None:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()

    return log


# -----------------------------------------------------------------------------


def start(args, stage: str):
    """Read the records (training and held-out: bad data fails here, before minutes of model loading), then load
    the model (or, with --resume, the last snapshot) and open the log for a stage.
    Under torchrun: join the process group and shard the model over the ranks (M.shard_model)."""
    rank, world, _, device = M.init_distributed(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    skipped: dict = {}
    records = D.load_records(args.data, skip_bad=args.skip_bad_records, skipped=skipped)
    heldout = D.load_records(args.eval_data)[:args.eval_records] if args.eval_records else []
    resume = None
    if args.resume:
        src = M.find_train_state(os.path.join(args.out, "resume"))
        if src is None:
            raise M.TrainingError(f"--resume: no snapshot in {os.path.join(args.out, 'resume')}; run without --resume")
        with open(os.path.join(src, M.META_FILE)) as f:
            resume = {"dir": src, **json.load(f)["resume_state"]}
        say(f"{stage}: resuming from {src} (phase {resume['phase']}, step {resume['step']})")
    llm = M.load_model(resume["dir"] if resume else args.model, device="cpu" if world > 1 else device,
                       dtype=torch.float32, with_alarm=True, trust_remote_code=args.trust_remote_code)
    if args.gradient_checkpointing:
        llm.model.gradient_checkpointing_enable()
    if world > 1:  # loaded whole on CPU by every rank; fully_shard moves each rank's shard to its device
        M.shard_model(llm, device)
    log = open_log(args.out, append=resume is not None)
    log({"config": vars(args), **({"world_size": world} if world > 1 else {})})
    say(f"{stage}: {len(records)} records from {args.data}; model {args.model}; out {args.out}"
        + (f"; {world} processes, global batch {args.batch_size * args.grad_accum * world}" if world > 1 else ""))
    return llm, records, heldout, log, skipped, resume


def finish(llm, args, log, skipped: dict, summary: dict) -> dict:
    """Log the summary (with any skipped records by name), save the final checkpoint to OUT."""
    skipped = M.union_over_ranks(skipped)  # under torchrun each rank saw the bad records of its own batches
    if skipped:
        summary.update(skipped_records=len(skipped), skipped=sorted(skipped.values()))
    log({"summary": summary})
    M.save_checkpoint(llm, args.out, meta={"args": vars(args), **summary})  # under torchrun: rank 0 writes it
    if M.dist_rank() == 0:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("skipped", "note")}, ensure_ascii=False))
    M.close_distributed()
    return summary


def main(argv=None) -> dict:
    args = get_args(argv)
    M.seed_everything(args.seed)
    llm, records, heldout, log, skipped, resume = start(args, "AT-SFT")
    common = dict(log=log, skipped=skipped, resume=resume)

    steps = 0
    if args.two_phase and not (resume and resume["phase"] == "at_sft"):
        # the authors' stage 1, alarm init: LM loss only; LLM + alarm vectors
        steps += train_sft(llm, args, records, phase="alarm_init", structured=False, use_atc=False,
                           train_alarm=True, train_heads=False, **common)
    steps += train_sft(llm, args, records, phase="at_sft", structured=False, use_atc=True,
                       train_alarm=True, train_heads=True, **common)

    summary = {"stage": "at_sft", "step": steps}
    if heldout:
        summary.update(heldout_check(llm, heldout, args, structured=False))
    return finish(llm, args, log, skipped, summary)


if __name__ == "__main__":
    D.run_cli(main)
