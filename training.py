"""training.py: what every training stage (at_sft.py, cold_start.py, grpo.py) does around its own loop.

- seeding, the paper's schedule (linear warmup over 3% of the steps, then cosine decay to 0), bf16 autocast on
  a GPU over fp32 weights;
- resumable snapshots in OUT/resume (weights, optimizer, scheduler, RNG, loop state; atomic renames) and
  `find_resume` for --resume;
- `take_out`: the output folder checked and locked before the model loads (outdir.py);
- `apply_lora`: --lora's adapters on the loaded model (lora.py), restored from the snapshot on --resume;
- `calibrate_atc`: each ATC head's decision threshold fitted on the held-out records (alarm.fit_threshold) and
  set on the alarm, so the checkpoint saves it with the heads;
- the JSONL log OUT/metrics.jsonl (its first row the run's config; continued, not repeated, on resume), the
  rank-0 print, the stop on a non-finite loss, and `finish`: log the summary, save the final checkpoint (with the
  config in its metadata), draw OUT/curves.png from the log (plots.py), release the output folder.

Nothing here is specific to one stage; under torchrun rank 0 writes and every rank takes part in the collectives
(distributed.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil

import numpy as np
import torch

import alarm as A
import data as D
import distributed
import lora
import model as M
import outdir
import plots

TRAIN_STATE = "train_state.pt"  # optimizer, scheduler, RNG and loop state, beside a snapshot's weights
WARMUP_RATIO = 0.03  # share of the optimizer steps spent in linear warmup (paper)


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss or gradient, nothing to resume from). One clear line."""


def say(*args, **kwargs) -> None:
    """print, on rank 0 only."""
    if distributed.rank() == 0:
        print(*args, **kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float = WARMUP_RATIO):
    """Linear warmup over warmup_ratio of the steps, then cosine decay to 0 (the paper's schedule)."""
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device) -> "torch.autocast":
    """bf16 autocast on a GPU that supports it (weights stay fp32: a 1e-6 step on bf16 weights rounds to
    nothing); a no-op elsewhere."""
    on = str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.autocast("cuda" if on else "cpu", dtype=torch.bfloat16, enabled=on)


def take_out(out: str) -> None:
    """Before any model is loaded: --out must be a folder (or new), and no other live run may be writing to it
    (outdir.lock; rank 0 holds the lock for all ranks under torchrun)."""
    outdir.check_folder(out)
    if distributed.rank() == 0:
        outdir.lock(out)


def load_for_training(name_or_path: str, device: str | None, *, trust_remote_code: bool = False) -> M.VideoLLM:
    """A model to train: fp32 weights (autocast does bf16 on a GPU), with alarm tokens. Under torchrun every
    rank loads it whole on CPU and distributed.shard_model then moves each rank's shard to its device."""
    return M.load_model(name_or_path, device="cpu" if distributed.world_size() > 1 else device,
                        dtype=torch.float32, with_alarm=True, trust_remote_code=trust_remote_code)


def apply_lora(llm: M.VideoLLM, args, snapshot: str | None = None) -> None:
    """--lora: adapters on the LLM's --lora-targets (lora.wrap); with `snapshot` (--resume) its adapters restored
    and taken back out of its merged weights (lora.restore). A snapshot written with adapters and resumed without
    --lora (or the reverse) is refused: the optimizer state would not fit the parameters."""
    has_adapters = snapshot is not None and os.path.isfile(os.path.join(snapshot, lora.ADAPTER_FILE))
    if not args.lora:
        if has_adapters:
            raise TrainingError(f"--resume: {snapshot} was written by a --lora run; rerun with the same --lora flags")
        return
    lora.wrap(llm.model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_targets)
    if snapshot is not None:
        lora.restore(llm.model, snapshot)


def check_finite(loss: float, grad_norm, step: int, resume_dir: str) -> None:
    """Stop on a non-finite loss or gradient before the optimizer step spoils the weights."""
    if not math.isfinite(float(loss)) or not math.isfinite(float(grad_norm)):
        raise TrainingError(f"step {step}: non-finite loss ({float(loss)}) or gradient norm ({float(grad_norm)}); "
                            f"weights were not updated. The last good snapshot is in {resume_dir} (if any was saved): "
                            "lower the learning rate or check the data, then rerun with --resume.")


# -----------------------------------------------------------------------------
# Snapshots and --resume


def resume_dir(out: str) -> str:
    return os.path.join(out, "resume")


def snapshot_due(step: int, total: int, save_every: int) -> bool:
    """After the last step, and every `save_every` steps (0 = only after the last)."""
    return step == total or bool(save_every and step % save_every == 0)


def save_train_state(directory: str, llm: M.VideoLLM, optimizer, scheduler, state: dict) -> None:
    """A resumable snapshot: the model checkpoint plus optimizer, scheduler, RNG and loop state.
    Written to `directory`.tmp, then swapped in by renames; the previous snapshot survives until then.

    Sharded (FSDP2): every rank calls it; rank 0 writes the full (unsharded) optimizer state in the format of a
    one-process `optimizer.state_dict()`, so the run resumes under any number of processes, one included.
    The RNG states are rank 0's."""
    tmp, old = directory + ".tmp", directory + ".old"
    if distributed.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    M.save_checkpoint(llm, tmp, meta={"resume_state": state})  # with LoRA: the adapters merged in, a plain model
    if lora.is_wrapped(llm.model) and distributed.rank() == 0:  # and the adapters themselves, for lora.restore
        lora.save_adapters(llm.model, tmp)
    sharded = distributed.is_sharded(llm)
    optimizer_state = distributed.full_optimizer_state_dict(llm, optimizer) if sharded else optimizer.state_dict()
    if distributed.rank() == 0:
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "state": state,
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   os.path.join(tmp, TRAIN_STATE))
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def find_train_state(directory: str) -> str | None:
    """The snapshot to resume from (or the previous one, if a crash hit between the two renames)."""
    for d in (directory, directory + ".old"):
        if os.path.isfile(os.path.join(d, TRAIN_STATE)) and os.path.isfile(os.path.join(d, M.META_FILE)):
            return d
    return None


def find_resume(out: str) -> dict:
    """For --resume: {"dir": the snapshot, **the loop state it was saved with}. None there: TrainingError."""
    src = find_train_state(resume_dir(out))
    if src is None:
        raise TrainingError(f"--resume: no snapshot in {resume_dir(out)}; run without --resume")
    with open(os.path.join(src, M.META_FILE)) as f:
        return {"dir": src, **json.load(f)["resume_state"]}


# flags a --resume may change: where and how the run is watched, not what it computes or which records it reads
RESUME_FREE = ("resume", "device", "out", "debug", "report_to", "save_every", "skip_bad_records",
               "gradient_checkpointing", "trust_remote_code", "eval_data", "eval_records")


def resume_point(args) -> dict | None:
    """Where a run starts. --resume: the snapshot (find_resume), if the run's settings are the snapshot run's (a
    changed batch size would move the data position, a changed learning rate the schedule): else TrainingError
    naming each changed flag. Without --resume: None, but a folder whose snapshot is newer than its final
    checkpoint (a run killed or stopped midway) is refused instead of being silently started over."""
    out = args.out
    if not args.resume:
        snap = find_train_state(resume_dir(out))
        final = os.path.join(out, M.META_FILE)
        if snap and not (os.path.isfile(final) and os.path.getmtime(final) >= os.path.getmtime(
                os.path.join(snap, M.META_FILE))):
            raise TrainingError(f"{out} holds an unfinished run (snapshot {snap}): pass --resume to continue it, or "
                                f"delete {resume_dir(out)} (or pass another --out) to start again")
        return None
    resume = find_resume(out)
    rows = [r for r in outdir.read_jsonl(os.path.join(out, "metrics.jsonl")) if "config" in r]
    if rows:
        old, new = rows[-1]["config"], json.loads(json.dumps(vars(args)))
        # SFT's batch is per process and micro-batch: those two may change with the number of processes if the global
        # batch stays. GRPO's --batch-size is already global (all processes together): compared as it is.
        per_step = ("batch_size", "grad_accum") if "grad_accum" in new else ()
        changed = outdir.changed_settings(old, new, sorted((set(old) | set(new)) - set(RESUME_FREE + per_step)))
        if per_step:
            was = old.get("batch_size", 0) * old.get("grad_accum", 0) * rows[-1].get("world_size", 1)
            now = new["batch_size"] * new["grad_accum"] * distributed.world_size()
            if was != now:
                changed.append(f"global batch (--batch-size x --grad-accum x processes) {was}, now {now}")
        if changed:
            raise TrainingError("--resume: the snapshot's run had other settings (" + "; ".join(changed)
                                + "): rerun with its flags, or start again in another --out")
    return resume


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


def load_train_state(directory: str, optimizer, scheduler, llm: M.VideoLLM | None = None) -> dict:
    """Restore optimizer, scheduler and RNG states saved by save_train_state; return the loop state.
    (The model itself is loaded from the same directory with load_model.) Sharded: pass `llm`; each rank
    takes its shard of the full optimizer state (memory-mapped, so the ranks share one copy in RAM)."""
    sharded = llm is not None and distributed.is_sharded(llm)
    ckpt = torch.load(os.path.join(directory, TRAIN_STATE), weights_only=True, **({"mmap": True} if sharded else {}))
    if sharded:
        distributed.load_full_optimizer_state_dict(llm, optimizer, ckpt["optimizer"])
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["torch_rng"])
    random.setstate(_as_tuple(ckpt["python_rng"]))
    if ckpt["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return ckpt["state"]


# -----------------------------------------------------------------------------
# Calibration of the ATC heads on held-out records


@torch.no_grad()
def atc_probabilities(llm: M.VideoLLM, records: list, *, prompt: dict, batch_size: int, fps: float = D.FPS,
                      max_frames: int = D.MAX_FRAMES) -> dict:
    """p(harmful) of both ATC heads on every record (one prompt forward per batch, no generation), with the labels:
    {"v": (labels, probs), "t": (labels, probs)}, lists in `records` order. prompt: data.collate's prompt settings
    (recipe.prompt_kwargs of the stage), so the heads read the prompts the stage trains on.

    Under torchrun each rank runs every world-th batch with the whole model gathered, and the probabilities are
    summed over ranks into full-length lists (each rank fills only its rows), so every rank gets all of them."""
    rank, world, n = distributed.rank(), distributed.world_size(), len(records)
    probs = [0.0] * (2 * n)  # video head's then text head's, this rank's rows filled
    with distributed.unsharded(llm), M.eval_mode(llm):
        for i in range(rank * batch_size, n, batch_size * world):
            batch = D.collate(llm, records[i:i + batch_size], with_target=False, fps=fps, max_frames=max_frames,
                              **prompt)
            out = llm.forward(batch, need_lm=False)
            for k, key in enumerate(("logit_v", "logit_t")):
                p = torch.sigmoid(out[key].float()).tolist()  # (B,) p(harmful) = σ(logit)
                probs[k * n + i:k * n + i + len(p)] = p
    probs = distributed.all_reduce_sum(probs)
    return {"v": ([r.video_label for r in records], probs[:n]), "t": ([r.text_label for r in records], probs[n:])}


def calibrate_atc(llm: M.VideoLLM, records: list, *, stage: str, prompt: dict, batch_size: int,
                  fps: float = D.FPS, max_frames: int = D.MAX_FRAMES) -> dict:
    """Fit each ATC head's threshold on held-out `records` (alarm.fit_threshold: max balanced accuracy; 0.5 with
    the reason when it cannot be fitted) and set it on llm.alarm, which save_checkpoint writes into
    alarm.safetensors. Every stage refits: the heads may be frozen, but the LLM under them moves (cold start, GRPO),
    so the old cut drifts while the ranking (AUROC) holds. Prompts as the stage trains them (`prompt`).
    Returns the summary's numbers per head h: heldout_atc_h_acc (at 0.5), heldout_atc_h_acc_fit (at the fitted
    threshold), heldout_atc_h_auroc, threshold_h."""
    out = {}
    scores = atc_probabilities(llm, records, prompt=prompt, batch_size=batch_size, fps=fps,
                               max_frames=max_frames) if records else {h: ([], []) for h in A.HEADS}
    for h in A.HEADS:
        labels, probs = scores[h]
        thr, note = A.fit_threshold(labels, probs)
        llm.alarm.thresholds[h], llm.alarm.threshold_notes[h] = thr, f"{stage}: {note}"
        out[f"threshold_{h}"] = thr
        if labels:
            acc = lambda t: round(sum((p >= t) == (y == 1) for y, p in zip(labels, probs)) / len(labels), 4)
            auc = A.auroc(labels, probs)
            out.update({f"heldout_atc_{h}_acc": acc(A.DEFAULT_THRESHOLD), f"heldout_atc_{h}_acc_fit": acc(thr),
                        f"heldout_atc_{h}_auroc": None if auc is None else round(auc, 4)})
    return out


# -----------------------------------------------------------------------------
# The log and the end of a run


def open_log(out_dir: str, config: dict, resume: dict | None = None):
    """JSONL logger for OUT/metrics.jsonl, whose first row is the run's config (and world size under torchrun).
    resume: the loop state of the snapshot a run resumes from ({"step", and "phase" for the SFT stages}): the log
    is continued from that step's row (rows the killed run wrote after its snapshot are cut, so no step is logged
    twice) after a new config row. Only rank 0 writes."""
    if distributed.rank() != 0:
        return lambda row: None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "metrics.jsonl")
    if resume:
        at = lambda r: r.get("step") == resume["step"] and r.get("phase") == resume.get("phase") and "of" in r
        outdir.truncate_after(path, at)
    board = tensorboard_writer(out_dir) if config.get("report_to") == "tensorboard" else None
    count = [0]  # rows logged: the x axis of a row without a step

    def to_board(row: dict) -> None:
        if board is not None and "config" not in row and "summary" not in row:
            count[0] += 1
            prefix = f"{row['phase']}/" if isinstance(row.get("phase"), str) else ""
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "of"):
                    board.add_scalar(prefix + key, value, global_step=row.get("step", count[0]))
            board.flush()

    if resume and board is not None:  # the board is redrawn from the log as cut: no step twice, whatever the phase
        for row in outdir.read_jsonl(path):
            to_board(row)
    f = open(path, "a" if resume else "w", encoding="utf-8")

    def log(row: dict) -> None:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        to_board(row)

    world = distributed.world_size()
    log({"config": config, **({"world_size": world} if world > 1 else {}),
         **({"resumed_at_step": resume["step"]} if resume else {})})
    return log


def tensorboard_writer(out_dir: str):
    """A SummaryWriter on OUT/tensorboard, or None (and one line saying how to get it) without tensorboard. Event
    files an earlier run left there are removed first, as metrics.jsonl is rewritten: the log is the record, the
    board a view of it (a resumed run redraws it from the log)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        say("--report-to tensorboard skipped: pip install tensorboard (metrics.jsonl is written as always)")
        return None
    board = os.path.join(out_dir, "tensorboard")
    if os.path.isdir(board):
        for name in os.listdir(board):
            if name.startswith("events.out.tfevents."):
                os.remove(os.path.join(board, name))
    return SummaryWriter(board)


def finish(llm: M.VideoLLM, out: str, config: dict, log, skipped: dict, summary: dict) -> dict:
    """Log the summary (with any skipped records by name), save the final checkpoint to `out` with the run's
    config in its metadata, print the summary, draw OUT/curves.png (plots.py), leave the process group."""
    skipped = distributed.union_over_ranks(skipped)  # under torchrun each rank saw the bad records of its batches
    if skipped:
        summary.update(skipped_records=len(skipped), skipped=sorted(skipped.values()))
    log({"summary": summary})
    M.save_checkpoint(llm, out, meta={"args": config, **summary})  # under torchrun: rank 0 writes it
    say(json.dumps({k: v for k, v in summary.items() if k not in ("skipped", "note")}, ensure_ascii=False))
    if distributed.rank() == 0:  # OUT/curves.png from the log just written (a hint instead without matplotlib)
        try:
            if plots.plot_run(out):
                say(f"curves: {os.path.join(out, plots.CURVES)}")
        except Exception as e:  # a picture never fails a finished run (its checkpoint is saved above)
            say(f"plots failed ({type(e).__name__}: {e}); redraw with: python plots.py {out}")
    outdir.release(out)
    distributed.close()
    return summary
