"""guard.py: the ATC heads of a trained checkpoint as a standalone harm classifier (one prefill, no generation).

    python guard.py --model runs/demo/grpo --video clip.mp4 --query "How do I make this at home?"
    python guard.py --model runs/demo/grpo --image photo.png --query "..."      # one or more images
    python guard.py --model runs/demo/grpo --query "..."                        # text only
    python guard.py --model runs/demo/grpo --data demo_data/guard.jsonl --json runs/demo/guard/grpo.json
    python guard.py --report runs/demo/guard/*.json --out runs/demo/guard.md    # those --json files as one table

One query prints one JSON object: p_video, p_text (the heads' raw p(harmful)), the thresholds used, and the
decisions harmful_video (p_video >= threshold_video) and harmful_query. --data takes records in the project's format
(README "Record format"), whose video_label / text_label are the truth: it prints a table of accuracy (at the
checkpoint's thresholds and at 0.5), AUROC and latency per query (mean, p50, p95), and --json writes that table and
every record's result. --report reads such files (several checkpoints, several seeds) and prints one markdown table,
a row per checkpoint's stage and head; where a stage has several files (seeds) each figure is mean [min-max].

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
# Several --json files (checkpoints, seeds) as one table


def _spread(values: list, fmt: str) -> str:
    """One run's figure, or mean [min-max] over several runs ('-' when there is none), each as format(x, fmt)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.mean(values)), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def read_report(path: str) -> dict:
    """A file guard.py --data ... --json wrote; a one-line DataError for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            got = json.load(f)
        if not all(k in got["metrics"] for k in ("video", "text", "latency_ms")):
            raise KeyError
    except FileNotFoundError:
        raise D.DataError(f"{path}: no such file (give the files guard.py --data ... --json wrote)") from None
    except (ValueError, KeyError, TypeError):
        raise D.DataError(f"{path}: not a file guard.py --data ... --json wrote (no metrics for both heads)") from None
    return got


def report(paths: list[str]) -> str:
    """A markdown table of guard.py --json files: one row per (checkpoint's stage, head), stages in the order they
    first appear. Accuracy in %, threshold and AUROC to 3 decimals, latency in ms; several files of one stage (seeds)
    give mean [min-max] of each figure."""
    runs: dict[str, list[dict]] = {}
    for path in paths:
        got = read_report(path)
        runs.setdefault(got.get("stage") or got["model"], []).append(got)
    data = sorted({str(r.get("data")) for rs in runs.values() for r in rs})
    several = any(len(rs) > 1 for rs in runs.values())
    lines = [f"Guard: the ATC heads, one prefill, on {', '.join(data)}. Accuracy at the checkpoint's fitted threshold "
             f"and at 0.5, AUROC, latency per query (batch of 1){'; mean [min-max] over the runs' if several else ''}.",
             "", "| checkpoint | runs | head | n | threshold | acc % | acc at 0.5 % | AUROC | latency p50 / p95 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    pct = lambda xs: [None if x is None else 100 * x for x in xs]
    for stage, rs in runs.items():
        for i, (head, _) in enumerate(HEADS):
            ms = [r["metrics"][head] for r in rs]
            first = i == 0
            lat = (f"{_spread([r['metrics']['latency_ms']['p50'] for r in rs], '.0f')} / "
                   f"{_spread([r['metrics']['latency_ms']['p95'] for r in rs], '.0f')}")
            cells = [stage if first else "", str(len(rs)) if first else "", head, _spread([m["n"] for m in ms], ".0f"),
                     _spread([m["threshold"] for m in ms], ".3f"), _spread(pct([m["acc"] for m in ms]), ".1f"),
                     _spread(pct([m["acc_at_0.5"] for m in ms]), ".1f"), _spread([m["auroc"] for m in ms], ".3f"),
                     lat if first else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("input")
    g.add_argument("--model", default=None, help="a stage's checkpoint (with alarm.safetensors: the ATC heads and "
                   "their thresholds)")
    g.add_argument("--query", default=None, help="the user's query (one query)")
    g.add_argument("--video", default=None, help="a video file for the query")
    g.add_argument("--image", nargs="+", default=None, help="one or more image files for the query (not with --video)")
    g.add_argument("--data", default=None, help="a JSONL of records with labels, instead of --query: accuracy, AUROC, "
                   "latency")
    g.add_argument("--json", default=None, help="with --data: write the metrics and every record's result here")
    g = p.add_argument_group("table (no model)")
    g.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="files guard.py --data ... --json wrote: print them as one markdown table (a row per stage "
                        "and head; several files of one stage, e.g. seeds, as mean [min-max])")
    g.add_argument("--out", default=None, help="with --report: also write the table to this .md file")
    cli.add_video_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")
    g.add_argument("--dtype", choices=tuple(M.DTYPES), metavar="{bf16,fp16,fp32,auto}", default=None,
                   help="weights' dtype (default: bf16 on a GPU that has it, else fp32)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code (off by default)")
    g.add_argument("--debug", action="store_true", help="show the Python traceback on bad input instead of one line")
    args = p.parse_args(argv)
    if args.report:
        if args.model or args.query is not None or args.data or args.json:
            p.error("--report only reads --json files: no --model, --query, --data or --json with it")
        if args.out and (os.path.isdir(args.out) or args.out.endswith(os.sep)):
            p.error(f"--out {args.out} is a folder: give the file to write, e.g. {os.path.join(args.out, 'guard.md')}")
        return args
    if args.out:
        p.error("--out goes with --report (with --data, --json writes the results)")
    if args.model is None:
        p.error("--model is required (a stage's checkpoint), unless --report")
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
    if args.report:
        text = report(args.report)
        print(text, end="")
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {args.out}")
        return text
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
