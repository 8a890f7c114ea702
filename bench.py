"""bench.py: one GRPO step two ways, side by side in one process: the straightforward path and ours.

The straightforward path is what the authors' TRL fork and the popular video-RL repositories do:
  rollout  `generate` on G copies of each prompt (as num_return_sequences=G does), one prompt after the other: the
           video's pixels are repeated G times, the vision encoder runs on each copy and the whole prompt is
           prefilled G times;
  update   π_ref's and π_θ's forwards each run the vision encoder on the G copies again and compute the logits
           of every position, prompt included, (G, T, vocab), then log-softmax row by row.
Our path (rollout.py's fast path, what grpo.py runs):
  rollout  each video is encoded once (`encode_videos`) and each prompt prefilled once; the G samples of a prompt
           share its KV cache, and all the step's prompts decode together in one loop (`sample_groups`);
  update   the forwards reuse the video features for all G rows (`repeat_rows`), and the LM head runs only at
           completion positions, 1024 rows at a time (`completion_logprobs`).
Both paths compute the same loss (test_grpo.py checks tokens, log-probs and loss); only time and memory differ.

Run:
    python bench.py                         # the issue's shape on CPU: ~152k vocabulary, 16 frames, G = 6, 128 tokens
    python bench.py --json bench.json       # also write the figures (step_speedup, memory_ratio, ...)
    python bench.py --prompts 1 4           # a step of 1 prompt, then of 4 (grpo.py's --batch-size; paper: 8)
    python bench.py --model lkhl/VideoLLaMA3-2B-Image-HF --device cuda   # a real model on a GPU

Peak memory: on CUDA, torch's peak allocated bytes during the step, above what was allocated before it; on CPU, the
process's peak resident memory during the step above its resident memory before it (sampled every millisecond,
with large allocations returned to the system on free, so the two paths are measured alike).
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
import threading
import time

import numpy as np
import torch

import cli
import data as D
import demo
import grpo
import model as M
import rollout
import training as T


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("shape")
    g.add_argument("--model", default="tiny-videollama3", help="a tiny family (built here with --vocab-size) or a "
                   "model name / path")
    g.add_argument("--vocab-size", type=cli.positive_int, default=151936, help="vocabulary of the tiny model (Qwen2.5 / "
                   "VideoLLaMA3: 151,936)")
    g.add_argument("--frames", type=cli.positive_int, default=16, help="frames of the benchmark video (sampled at 1 fps)")
    g.add_argument("--frame-size", default="252x224", help="WIDTHxHEIGHT of its frames (the tiny VideoLLaMA3: 1,152 "
                   "visual tokens for 16)")
    g.add_argument("--group-size", type=cli.number(int, low=2, what="an integer >= 2"), default=6, help="G, completions per prompt (paper: 6)")
    g.add_argument("--completion-tokens", type=cli.positive_int, default=128, help="tokens generated per completion")
    g.add_argument("--prompts", type=cli.positive_int, nargs="+", default=[1], help="prompts per GRPO step (grpo.py's "
                   "--batch-size; paper: 8), each with its own query; several counts are measured one after the other")
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=cli.positive_int, default=1, help="measured GRPO steps per path (after one short warm-up step "
                   "each)")
    g.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# The straightforward path


def straightforward_logprobs(llm: M.VideoLLM, batch: dict, completion: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """log π(o_t | ...) the usual way: the full forward (vision encoder included) on G copies of the prompt ++
    completion, logits at every position, then log-softmax one row at a time. (B, L), 0 where mask is 0."""
    P = batch["input_ids"].shape[1]
    inputs = M.prompt_and_completion(batch, completion, mask)
    logits = llm.model(**inputs, use_cache=False).logits[:, :-1]  # (B, T-1, V): every position, model dtype
    targets = inputs["input_ids"][:, 1:]
    rows = [row.float().log_softmax(dim=-1).gather(1, t[:, None]).squeeze(1) for row, t in zip(logits, targets)]
    return torch.stack(rows)[:, P - 1:] * mask  # (B, L): the completion's


def straightforward_rollout(llm: M.VideoLLM, prompts: list[dict], G: int, **sampling):
    """One `generate` per prompt, one after the other: per prompt (G-row batch, completion (G, L), texts)."""
    out = []
    for prompt in prompts:
        batch = rollout.repeat_rows(prompt, G)  # pixels and all, G times (num_return_sequences)
        out.append((batch, *M.generate(llm, batch, **sampling)))
    return out


def fast_rollout(llm: M.VideoLLM, prompts: list[dict], G: int, **sampling):
    """All prompts in one decode loop, each with its own generator (as grpo.py samples): the same triples."""
    prompts = [rollout.encode_videos(llm, p) for p in prompts]
    generators = [torch.Generator(llm.device).manual_seed(int(torch.randint(2**62, ()))) for _ in prompts]
    groups = rollout.sample_groups(llm, prompts, G, generators=generators, **sampling)
    return [(rollout.repeat_rows(p, G), completion, texts) for p, (completion, texts) in zip(prompts, groups)]


TOP_K = 50  # both paths: top-k 50 before top-p 0.95 (the authors' effective setting)

PATHS = {"straightforward": (straightforward_rollout, straightforward_logprobs),
         "fast": (fast_rollout, M.completion_logprobs)}


def grpo_step(path: str, policy, ref, prompts: list[dict], optimizer, G: int, tokens: int) -> dict:
    """One GRPO step on the prompts (--passes 1, β = 0.04): rollout, then per group (as grpo.py's update) π_ref's
    log-probs, π_θ's forward and backward; optimizer step. Rewards are random stand-ins (the benchmark measures the
    model's work, not the reward's)."""
    do_rollout, logprobs = PATHS[path]
    t0 = time.perf_counter()
    with T.autocast(policy.device):
        groups = do_rollout(policy, prompts, G, max_new_tokens=tokens, do_sample=True, temperature=1.0, top_p=0.95,
                            top_k=TOP_K)
    masks = [M.completion_mask(completion, policy.eot_id) for _, completion, _ in groups]
    t1 = time.perf_counter()
    for (batch, completion, _), mask in zip(groups, masks):
        with T.autocast(policy.device):
            with torch.no_grad():
                ref_logp = logprobs(ref, batch, completion, mask)
            logp = logprobs(policy, batch, completion, mask)
        advantages = grpo.group_advantages(torch.rand(G, device=policy.device))
        loss, _ = grpo.grpo_loss(logp, logp.detach(), ref_logp, advantages, mask, n_seqs=G * len(groups))
        loss.backward()  # accumulated over the step's groups
    _sync(policy.device)
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(policy.device)
    t3 = time.perf_counter()
    return {"s_rollout": t1 - t0, "s_forward_backward": t2 - t1, "s_step": t3 - t0,
            "completion_len": float(torch.cat(masks).sum(dim=1).float().mean())}


# -----------------------------------------------------------------------------
# Plumbing: the benchmark model and video, memory measurement


def build_model(args, device: str, tmp: str) -> M.VideoLLM:
    """A tiny family with a real-size vocabulary (its LM head and embeddings resized), or a real model as it is.
    The video processor's pixel budget is raised so the benchmark video keeps its size (and its visual tokens)."""
    path = args.model
    if args.model in demo.TINY_MODELS:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = os.path.join(tmp, "model")
        demo.build_tiny(args.model, path)
        hf = AutoModelForImageTextToText.from_pretrained(path)
        torch.manual_seed(args.seed)
        hf.resize_token_embeddings(args.vocab_size, mean_resizing=False)
        hf.save_pretrained(path)
        proc = AutoProcessor.from_pretrained(path)
        w, h = map(int, args.frame_size.split("x"))
        proc.video_processor.size = {"shortest_edge": proc.video_processor.size["shortest_edge"],
                                     "longest_edge": args.frames * w * h}
        proc.save_pretrained(path)
    return M.load_model(path, device=device, dtype=torch.float32, with_alarm=True)


def write_video(path: str, frames: int, size: str) -> None:
    import av

    w, h = map(int, size.split("x"))
    rng = np.random.default_rng(0)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for _ in range(frames):
            frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


class PeakMemory:
    """Peak memory (bytes) in a `with` block, above the level at its start. CUDA: the allocator's peak. CPU: the
    process's resident set, sampled every millisecond by a thread (torch releases the GIL in its kernels)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak_rss = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak_rss = max(self.peak_rss, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak_rss, _rss()) - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _return_freed_memory_to_the_system() -> None:
    """glibc keeps freed heap memory; allocations of 1 MiB and more served by mmap are unmapped on free, so the
    resident set follows the live tensors and the second path measured does not inherit the first's peak."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def main(argv=None) -> dict:
    args = parse_args(argv)
    _return_freed_memory_to_the_system()
    device = args.device or M.default_device()
    T.seed_everything(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        policy = build_model(args, device, tmp)
        ref = M.load_model(policy.source, device=device, dtype=torch.float32, with_alarm=True)
        video = os.path.join(tmp, "bench.mp4")
        write_video(video, args.frames, args.frame_size)
        prompts = [D.collate(policy, [record], structured=True, with_target=False, fps=1.0, max_frames=args.frames)
                   for record in bench_records(video, max(args.prompts))]
    prompt = prompts[0]
    ref.model.eval().requires_grad_(False)
    M.set_trainable(policy, train_llm=True, train_alarm=False, train_heads=False)
    policy.model.train()
    optimizer = torch.optim.AdamW(M.param_groups(policy, 1e-6, 0.0, 0.0, 0.01))  # the paper's lr: weights barely move
    visual = int((prompt["input_ids"] == policy.model.config.video_token_id).sum())
    vocab = policy.model.get_output_embeddings().weight.shape[0]
    shape = {"model": args.model, "device": str(policy.device), "vocab_size": vocab,
             "frames": args.frames, "visual_tokens": visual, "prompt_tokens": prompt["input_ids"].shape[1],
             "group_size": args.group_size, "completion_tokens": args.completion_tokens,
             "threads": torch.get_num_threads(), "prompts": args.prompts}
    print("bench:", json.dumps(shape))

    by_prompts = {}  # prompts per step -> that step's figures
    for n in args.prompts:
        by_prompts[str(n)] = measure(policy, ref, prompts[:n], optimizer, args)
        print(table({**shape, **by_prompts[str(n)], "prompts": n}))
    report = {**shape, **by_prompts[str(args.prompts[0])], "by_prompts": by_prompts,  # top level: the first count's
              "rollout_speedup_per_prompts": {n: f["rollout_speedup"] for n, f in by_prompts.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"bench: figures written to {args.json}")
    return report


def bench_records(video: str, n: int) -> list[D.Record]:
    """n prompts on the benchmark video, the first one the single-prompt bench's; the others' queries grow longer
    (different prompt lengths, as in a real step)."""
    query = "What is happening in this video, and is it safe to imitate?"
    return [D.Record(id=f"bench-{i}", query=query + " And what happens next?" * i, video=video, target="",
                     video_label=0, text_label=0) for i in range(n)]


def measure(policy, ref, prompts: list[dict], optimizer, args) -> dict:
    """--steps GRPO steps on the prompts per path, after one short warm-up step each; the means and the ratios."""
    results = {path: [] for path in PATHS}
    for path in PATHS:  # warm-up: first-call costs (allocator, kernels) out of the measurement
        grpo_step(path, policy, ref, prompts, optimizer, args.group_size, tokens=4)
    for i in range(args.steps):
        for path in PATHS:
            torch.manual_seed(args.seed + i)
            with PeakMemory(policy.device) as mem:
                row = grpo_step(path, policy, ref, prompts, optimizer, args.group_size, args.completion_tokens)
            results[path].append({**row, "peak_bytes": mem.peak})
            print(f"  {len(prompts)} prompt(s), step {i + 1} {path:>15}: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in results[path][-1].items()))
    mean = {path: {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} for path, rows in results.items()}
    slow, fast = mean["straightforward"], mean["fast"]
    return {"straightforward": slow, "fast": fast,
            "rollout_speedup": slow["s_rollout"] / fast["s_rollout"],
            "forward_backward_speedup": slow["s_forward_backward"] / fast["s_forward_backward"],
            "step_speedup": slow["s_step"] / fast["s_step"],
            "memory_ratio": fast["peak_bytes"] / slow["peak_bytes"]}


def table(r: dict) -> str:
    gb = lambda b: f"{b / 2**30:.2f} GB"
    rows = [("rollout (s)", "s_rollout", lambda v: f"{v:.2f}", "rollout_speedup", "x faster"),
            ("forward + backward (s)", "s_forward_backward", lambda v: f"{v:.2f}", "forward_backward_speedup",
             "x faster"),
            ("whole GRPO step (s)", "s_step", lambda v: f"{v:.2f}", "step_speedup", "x faster"),
            ("peak memory", "peak_bytes", gb, "memory_ratio", "x the memory")]
    lines = [f"\n{r['model']} on {r['device']}: vocabulary {r['vocab_size']:,}, {r['frames']} frames = "
             f"{r['visual_tokens']:,} visual tokens ({r['prompt_tokens']:,} prompt tokens), G = {r['group_size']}, "
             f"{r['completion_tokens']} completion tokens, {r.get('prompts', 1)} prompt(s) per step",
             "", "| | straightforward | fast | ratio |", "|---|---|---|---|"]
    for name, key, fmt, ratio, word in rows:
        lines.append(f"| {name} | {fmt(r['straightforward'][key])} | {fmt(r['fast'][key])} | {r[ratio]:.2f}{word} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
