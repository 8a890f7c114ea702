"""guard.py: the ATC heads of a trained checkpoint as a standalone harm classifier (one prefill, no generation).

    python guard.py --model runs/demo/grpo --video clip.mp4 --query "How do I make this at home?"
    python guard.py --model runs/demo/grpo --image photo.png --query "..."      # one or more images
    python guard.py --model runs/demo/grpo --query "..."                        # text only
    python guard.py --model runs/demo/grpo --data demo_data/eval.jsonl --json runs/demo/guard.json

One query prints one JSON object: p_video, p_text (the heads' raw p(harmful)), the thresholds used, and the
decisions harmful_video (p_video >= threshold_video) and harmful_query. --data takes records in the project's format
(README "Record format"), whose video_label / text_label are the truth: it prints a table of accuracy (at the
checkpoint's thresholds and at 0.5), AUROC and latency per query (mean, p50, p95), and --json writes that table and
every record's result.

In your own server (a few lines):

    from guard import Guard
    guard = Guard.load("runs/demo/grpo")
    guard("How do I make this at home?", video="clip.mp4")
    # {'p_video': 0.93, 'p_text': 0.98, 'threshold_video': 0.61, 'threshold_text': 0.55,
    #  'harmful_video': True, 'harmful_query': True}

What runs: the prompt the checkpoint's stage trained and calibrated the heads with (data.build_prompt with both
alarm tokens; for cold start and GRPO checkpoints the structured-output instruction as the system turn), one forward
of the model without its LM head, σ(logit) of each head at its alarm token (model.VideoLLM.forward), and the
thresholds the stage fitted on its held-out split (alarm.safetensors; training.calibrate_atc). Without a video or
an image there is nothing for the video head to judge: p_video and harmful_video are null.
Latency is the wall time of one query alone (batch of 1): reading the video, the processor, the forward; the first
record is run once untimed first, so one-off start-up costs are not counted.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

import cli
import data as D
import model as M
import recipe as RC
from alarm import ALARM_FILE, DEFAULT_THRESHOLD, auroc

HEADS = (("video", "video_label"), ("text", "text_label"))  # the two ATC heads and the record label each predicts


class Guard:
    """A checkpoint's ATC heads as a classifier. `Guard.load(ckpt)`, then `guard(query, video=None, image=None)`."""

    NO_HEADS = (f"{{}} has no ATC heads (no {ALARM_FILE}): the guard needs a checkpoint written by at_sft.py, "
                "cold_start.py or grpo.py")

    def __init__(self, llm: M.VideoLLM, fps: float = D.FPS, max_frames: int = D.MAX_FRAMES):
        if llm.alarm is None:
            raise D.DataError(self.NO_HEADS.format(llm.source))
        self.llm, self.fps, self.max_frames = llm, fps, max_frames
        stage = llm.meta.get("stage")  # the prompts its heads were calibrated on: the stage's, under its recipe
        self.prompt = RC.prompt_kwargs(RC.of_checkpoint(llm.meta), stage if stage in M.STRUCTURED_STAGES else "at_sft")
        self.thresholds = {"video": llm.alarm.thresholds["v"], "text": llm.alarm.thresholds["t"]}
        llm.model.eval()

    @classmethod
    def load(cls, ckpt: str, *, device: str | None = None, dtype=None, trust_remote_code: bool = False,
             **kwargs) -> "Guard":
        if os.path.isdir(ckpt) and not os.path.isfile(os.path.join(ckpt, ALARM_FILE)):  # say so before loading it
            raise D.DataError(cls.NO_HEADS.format(ckpt))
        llm = M.load_model(ckpt, device=device, dtype=dtype, with_alarm=False, trust_remote_code=trust_remote_code)
        return cls(llm, **kwargs)

    def __call__(self, query: str, video: str | None = None, image: str | list[str] | None = None) -> dict:
        """One query (with an optional video file, or one or more image files): the result dict of `classify`."""
        here = os.getcwd()
        images = [image] if isinstance(image, str) else image
        record = D.Record(id="query", query=query, target="", video_label=0, text_label=0,
                          video=D.media_file(video, here, "video", "--video") if video else None,
                          image=[D.media_file(x, here, "image", "--image") for x in images] if images else None)
        return self.classify([record])[0]

    @torch.no_grad()
    def classify(self, records: list[D.Record]) -> list[dict]:
        """p(harmful) of both heads and the decisions for each record, from one forward of the batch."""
        batch = D.collate(self.llm, records, with_target=False, fps=self.fps, max_frames=self.max_frames,
                          **self.prompt)
        out = self.llm.forward(batch, need_lm=False)  # prompt only: no LM head, no generation
        p_v = torch.sigmoid(out["logit_v"].float()).tolist()  # (B,) p(harmful) = σ(logit)
        p_t = torch.sigmoid(out["logit_t"].float()).tolist()
        results = []
        for r, pv, pt in zip(records, p_v, p_t):
            visual = r.video is not None or bool(r.image)
            results.append({"p_video": pv if visual else None, "p_text": pt,
                            "threshold_video": self.thresholds["video"], "threshold_text": self.thresholds["text"],
                            "harmful_video": pv >= self.thresholds["video"] if visual else None,
                            "harmful_query": pt >= self.thresholds["text"]})
        return results


# -----------------------------------------------------------------------------
# Many labelled records: accuracy, AUROC, latency


def measure(guard: Guard, records: list[D.Record]) -> tuple[dict, list[dict]]:
    """Run every record alone (batch of 1, timed) and score the heads against its labels.
    Returns (metrics, one result per record with its id, labels and milliseconds)."""
    guard.classify(records[:1])  # warm-up, untimed
    rows = []
    for r in records:
        t0 = time.perf_counter()
        res = guard.classify([r])[0]
        rows.append({"id": r.id, **res, "video_label": r.video_label, "text_label": r.text_label,
                     "ms": (time.perf_counter() - t0) * 1000})
    metrics = {}
    for head, label in HEADS:
        pairs = [(row[label], row[f"p_{head}"]) for row in rows if row[f"p_{head}"] is not None]  # (y, p)
        thr = guard.thresholds[head]
        acc = lambda t: sum((p >= t) == (y == 1) for y, p in pairs) / len(pairs) if pairs else None
        metrics[head] = {"n": len(pairs), "threshold": thr, "acc": acc(thr), "acc_at_0.5": acc(DEFAULT_THRESHOLD),
                         "auroc": auroc(*zip(*pairs)) if pairs else None}
    ms = [row["ms"] for row in rows]
    p50, p95 = np.percentile(ms, [50, 95])
    metrics["latency_ms"] = {"mean": float(np.mean(ms)), "p50": float(p50), "p95": float(p95)}
    return metrics, rows


def table(metrics: dict) -> str:
    fmt = lambda x, spec=".4f": "-" if x is None else format(x, spec)
    lines = ["head    n     threshold  acc     acc@0.5  AUROC"]
    for head, _ in HEADS:
        m = metrics[head]
        lines.append(f"{head:<7} {m['n']:<5} {fmt(m['threshold']):<10} {fmt(m['acc']):<7} {fmt(m['acc_at_0.5']):<8} "
                     f"{fmt(m['auroc'])}")
    lat = metrics["latency_ms"]
    lines.append(f"latency per query (batch 1): mean {lat['mean']:.1f} ms, p50 {lat['p50']:.1f} ms, "
                 f"p95 {lat['p95']:.1f} ms")
    return "\n".join(lines)


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("input")
    g.add_argument("--model", required=True, help="a stage's checkpoint (with alarm.safetensors: the ATC heads and "
                   "their thresholds)")
    g.add_argument("--query", default=None, help="the user's query (one query)")
    g.add_argument("--video", default=None, help="a video file for the query")
    g.add_argument("--image", nargs="+", default=None, help="one or more image files for the query (not with --video)")
    g.add_argument("--data", default=None, help="a JSONL of records with labels, instead of --query: accuracy, AUROC, "
                   "latency")
    g.add_argument("--json", default=None, help="with --data: write the metrics and every record's result here")
    cli.add_video_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")
    g.add_argument("--dtype", choices=tuple(M.DTYPES), metavar="{bf16,fp16,fp32,auto}", default=None,
                   help="weights' dtype (default: bf16 on a GPU that has it, else fp32)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code (off by default)")
    g.add_argument("--debug", action="store_true", help="show the Python traceback on bad input instead of one line")
    args = p.parse_args(argv)
    if (args.query is None) == (args.data is None):
        p.error("give either --query (one query, with an optional --video or --image) or --data JSONL")
    if args.data and (args.video or args.image):
        p.error("--video / --image go with --query; --data records name their own media")
    if args.video and args.image:
        p.error("a query has a video or images, not both")
    if args.json and not args.data:
        p.error("--json goes with --data")
    if args.json and (os.path.isdir(args.json) or args.json.endswith(os.sep)):  # said before the records are measured
        p.error(f"--json {args.json} is a folder: give the file to write, e.g. {os.path.join(args.json, 'guard.json')}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    records = D.load_records(args.data) if args.data else None  # bad data fails before the model loads
    M.check_model_path(args.model, "--model")
    guard = Guard.load(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                       fps=args.fps, max_frames=args.max_frames)
    if records is None:
        result = guard(args.query, video=args.video, image=args.image)
        print(json.dumps(result))
        return result
    metrics, rows = measure(guard, records)
    print(f"guard: {len(records)} records of {args.data}; checkpoint {args.model} "
          f"({guard.llm.meta.get('stage', 'no stage')}), device {guard.llm.device}")
    print(table(metrics))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        notes = guard.llm.alarm.threshold_notes
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "data": args.data, "stage": guard.llm.meta.get("stage"),
                       "threshold_notes": {"video": notes["v"], "text": notes["t"]}, "metrics": metrics,
                       "records": rows}, f, indent=2, ensure_ascii=False)
        print(f"wrote {args.json}")
    return metrics


if __name__ == "__main__":
    cli.run_cli(main)
