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
    python bench.py --mode real-size --json real.json   # VideoLLaMA3-2B's memory, full vs LoRA (see real_size)

--mode real-size builds VideoLLaMA3-2B's architecture from its config numbers (VIDEOLLAMA3_2B) with random weights,
nothing downloaded, at --layers LLM depths, and measures the peak memory of one SFT step and one GRPO step (the fast
path), full fine-tuning vs LoRA; memory = a + b·layers is fitted and extrapolated to the real 28 layers, beside the
arithmetic of weights, gradients and AdamW states.

Peak memory: on CUDA, torch's peak allocated bytes during the step, above what was allocated before it; on CPU, the
process's peak resident memory during the step above its resident memory before it (sampled every millisecond,
with large allocations returned to the system on free, so the two paths are measured alike).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import tempfile
import threading
import time

import numpy as np
import torch

import alarm as A
import cli
import data as D
import demo
import grpo_loss
import lora
import model as M
import recipe as RC
import rollout
import training as T


def frame_size(text: str) -> str:
    """argparse type of --frame-size: WIDTHxHEIGHT, two integers >= 1 (kept as the text)."""
    w, _, h = text.lower().partition("x")
    if not (w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 252x224, got {text!r}")
    return f"{int(w)}x{int(h)}"


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--mode", choices=("speed", "real-size"), default="speed", help="speed: the straightforward vs "
                   "fast GRPO step; real-size: VideoLLaMA3-2B's peak memory, full fine-tuning vs LoRA")
    g = p.add_argument_group("shape")
    g.add_argument("--model", default="tiny-videollama3", help="a tiny family (built here with --vocab-size) or a "
                   "model name / path")
    g.add_argument("--vocab-size", type=cli.positive_int, default=151936,
                   help="vocabulary of the tiny model (Qwen2.5 / VideoLLaMA3: 151,936)")
    g.add_argument("--frames", type=cli.positive_int, default=None, help="frames of the benchmark video (sampled at 1 "
                   "fps; default 16, real-size 4)")
    g.add_argument("--frame-size", type=frame_size, default=None, help="WIDTHxHEIGHT of its frames (default 252x224: "
                   "the tiny VideoLLaMA3 gives 1,152 visual tokens for 16; real-size 112x112: 64 visual tokens for 4)")
    g.add_argument("--group-size", type=cli.number(int, low=2, what="an integer >= 2"), default=None,
                   help="G, completions per prompt (default: the paper's 6; real-size 2)")
    g.add_argument("--completion-tokens", type=cli.positive_int, default=None, help="tokens generated per completion "
                   "(default 128; real-size 8)")
    g.add_argument("--prompts", type=cli.positive_int, nargs="+", default=[1], help="prompts per GRPO step (grpo.py's "
                   "--batch-size; paper: 8), each with its own query; several counts are measured one after the other")
    g = p.add_argument_group("real size (--mode real-size)")
    g.add_argument("--layers", type=cli.positive_int, nargs=2, default=[2, 4], help="the two LLM depths built and "
                   "measured (the fit a + b·layers goes through both; the real model has 28)")
    g.add_argument("--scale", type=cli.positive_int, default=1, help="divide every width and the vocabulary by this "
                   "(1: the real widths; 8 for a quick test; the vision encoder's heads are divided too)")
    g.add_argument("--text-tokens", type=cli.positive_int, default=256, help="target tokens of the SFT step's sample")
    g.add_argument("--vision-layers", type=cli.positive_int, default=None, help="layers of the vision encoder "
                   "(default: the real 27; fewer only for a quick test: the LLM's figures do not depend on it)")
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=cli.positive_int, default=1,
                   help="measured GRPO steps per path (after one short warm-up step each)")
    g.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    g.add_argument("--seed", type=cli.seed_int, default=0, help="random seed")
    g.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.layers[0] == args.layers[1]:
        p.error(f"--layers needs two different depths (the fit a + b·layers goes through both), got {args.layers}")
    real = args.mode == "real-size"  # a short sequence there: the memory of a 2B model on CPU, not its speed
    for name, speed, small in (("frames", 16, 4), ("frame_size", "252x224", "112x112"), ("group_size", 6, 2),
                               ("completion_tokens", 128, 8)):
        if getattr(args, name) is None:
            setattr(args, name, small if real else speed)
    return args


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


TOP_K = RC.AUTHORS.top_k  # both paths: top-k 50 before top-p 0.95 (the authors' effective setting)

PATHS = {"straightforward": (straightforward_rollout, straightforward_logprobs),
         "fast": (fast_rollout, M.completion_logprobs)}


def grpo_step(path: str, policy, ref, prompts: list[dict], optimizer, G: int, tokens: int) -> dict:
    """One GRPO step on the prompts (--passes 1, β = 0.04): rollout, then per group (as grpo.py's update) π_ref's
    log-probs, π_θ's forward and backward; optimizer step. Rewards are random stand-ins (the benchmark measures the
    model's work, not the reward's)."""
    do_rollout, logprobs = PATHS[path]
    t0 = time.perf_counter()
    with T.autocast(policy.device):
        groups = do_rollout(policy, prompts, G, max_new_tokens=tokens, do_sample=True, temperature=1.0, top_p=M.TOP_P,
                            top_k=TOP_K)
    masks = [M.completion_mask(completion, policy.eot_id) for _, completion, _ in groups]
    t1 = time.perf_counter()
    for (batch, completion, _), mask in zip(groups, masks):
        with T.autocast(policy.device):
            with torch.no_grad():
                ref_logp = logprobs(ref, batch, completion, mask)
            logp = logprobs(policy, batch, completion, mask)
        advantages = grpo_loss.group_advantages(torch.rand(G, device=policy.device))
        loss, _ = grpo_loss.grpo_loss(logp, logp.detach(), ref_logp, advantages, mask, n_seqs=G * len(groups))
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
    if args.mode == "real-size":
        return write_report(args, {"real_size": real_size(args)})
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
    optimizer = torch.optim.AdamW(M.param_groups(policy, M.LR_LLM, 0.0, 0.0, 0.01))  # the paper's lr: weights barely move
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
    return write_report(args, report)


def write_report(args, report: dict) -> dict:
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

# -----------------------------------------------------------------------------
# --mode real-size: VideoLLaMA3-2B's memory, full fine-tuning vs LoRA

# VideoLLaMA3-2B, random weights. LLM: Qwen2.5-1.5B's config.json (Qwen/Qwen2.5-1.5B). Vision encoder: SigLIP-so400m-
# patch14-384's vision tower (google/siglip-so400m-patch14-384: 1152 wide, 4304 MLP, 27 layers, 16 heads, patch 14),
# which VideoLLaMA3's encoder (DAMO-NLP-SG/VL3-SigLIP-NaViT) is initialised from (VideoLLaMA3 paper, §3.1).
VIDEOLLAMA3_2B = {
    "text": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True),
    "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14),
}
REAL_DTYPE = torch.bfloat16  # the measured weights (CPU runs bf16 matmuls)
ADAPTER_BYTES = REAL_DTYPE.itemsize  # peft.inject_adapter_in_model makes LoRA A and B in the base layer's dtype
STAGES = {"sft": dict(train_llm=True, train_alarm=True, train_heads=True),  # AT-SFT: LLM, alarm vectors, heads
          "grpo": dict(train_llm=True, train_alarm=False, train_heads=False)}  # GRPO: the LLM only


def real_config(layers: int, scale: int, ids: dict, vision_layers: int | None = None):
    """VIDEOLLAMA3_2B with `layers` LLM layers and every width (and the vocabulary) divided by `scale`."""
    from transformers import VideoLlama3Config

    text, vision = dict(VIDEOLLAMA3_2B["text"]), dict(VIDEOLLAMA3_2B["vision"])
    for cfg in (text, vision):
        for key in ("hidden_size", "intermediate_size", "vocab_size"):
            if key in cfg:
                cfg[key] //= scale
    if vision_layers:
        vision["num_hidden_layers"] = vision_layers
    vision["num_attention_heads"] //= scale  # its 2-D rotary embedding needs the head width a multiple of 4: kept 72
    if scale not in (1, 2, 4, 8, 16):
        raise SystemExit(f"bench.py: --scale {scale}: use 1, 2, 4, 8 or 16 (the head counts must divide)")
    text.update(num_hidden_layers=layers, rope_parameters={"rope_type": "default", "rope_theta": text.pop("rope_theta")},
                bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    return VideoLlama3Config(text_config=dict(model_type="qwen2", **text), vision_config=vision,
                             image_token_id=ids["image"], video_token_id=ids["video"],
                             tie_word_embeddings=text["tie_word_embeddings"])


def build_real(layers: int, scale: int, seed: int, tiny: M.VideoLLM, vision_layers: int | None = None) -> M.VideoLLM:
    """The real-size architecture with random weights in REAL_DTYPE and the tiny VideoLLaMA3's processor (same
    family, same special tokens; its ids fit the real vocabulary), alarm tokens added as load_model does."""
    from transformers import VideoLlama3ForConditionalGeneration

    tok, cfg = tiny.processor.tokenizer, tiny.model.config
    ids = {"bos": cfg.text_config.bos_token_id, "eos": cfg.text_config.eos_token_id,
           "pad": cfg.text_config.pad_token_id, "image": cfg.image_token_id, "video": cfg.video_token_id}
    torch.manual_seed(seed)
    hf = VideoLlama3ForConditionalGeneration._from_config(real_config(layers, scale, ids, vision_layers), dtype=REAL_DTYPE)
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = ids["eos"], ids["pad"]
    return M.VideoLLM(model=hf, processor=tiny.processor, alarm=A.add_alarm_tokens(hf, tok), source="real-size")


def real_arithmetic(layers: int, scale: int) -> dict:
    """Parameter counts of the LLM from the config numbers alone (independent of the built model)."""
    t = VIDEOLLAMA3_2B["text"]
    H, I, V = t["hidden_size"] // scale, t["intermediate_size"] // scale, t["vocab_size"] // scale
    kv = H // t["num_attention_heads"] * t["num_key_value_heads"]  # K and V width (grouped-query attention)
    per_layer = (H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * I + 2 * H  # q,k,v (+bias), o, gate/up/down, 2 norms
    r = lora.R  # one adapter per projection: r·(in + out) = A (r × in) + B (out × r)
    lora_per_layer = r * ((H + H) + 2 * (H + kv) + (H + H) + 2 * (H + I) + (I + H))
    return {"llm": V * H + layers * per_layer + H,  # embeddings (the tied LM head: counted once), layers, final norm
            "llm_per_layer": per_layer, "lora": layers * lora_per_layer, "lora_per_layer": lora_per_layer,
            "alarm": 2 * H + 2 * (H + 1)}  # alarm vectors (2, H), ATC heads H -> 1 (video, text)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def real_step(stage: str, use_lora: bool, layers: int, args, tiny: M.VideoLLM) -> dict:
    """One step of `stage` at `layers` LLM layers, full or LoRA: peak resident memory above the level before the
    model was built (so weights, gradients, AdamW states and activations are all in it), and the tensors' bytes."""
    gc.collect()
    base = _rss()
    policy = build_real(layers, args.scale, args.seed, tiny, args.vision_layers)
    if use_lora:
        lora.wrap(policy.model)
    M.set_trainable(policy, **STAGES[stage])
    policy.model.train()
    optimizer = torch.optim.AdamW(M.param_groups(policy, M.LR_LLM, M.LR_ALARM, M.LR_HEADS, 0.01))
    record = D.Record(id="real", query="What is happening in this video, and is it safe to imitate?",
                      video=args.video, target=_text_of(policy, args.text_tokens), video_label=1, text_label=0)
    ref = build_real(layers, args.scale, args.seed + 1, tiny, args.vision_layers) if stage == "grpo" else None  # π_ref: its own frozen copy
    with PeakMemory(torch.device("cpu")) as mem:
        if stage == "sft":
            batch = D.collate(policy, [record], structured=True, with_target=True, fps=1.0, max_frames=args.frames)
            out = policy.forward(batch)
            loss, _ = A.at_sft_loss(out["lm_loss"], out["logit_v"], out["logit_t"], batch["video_label"],
                                    batch["text_label"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens = int((batch["labels"] != -100).sum())
        else:
            ref.model.eval().requires_grad_(False)
            prompt = D.collate(policy, [record], structured=True, with_target=False, fps=1.0, max_frames=args.frames)
            grpo_step("fast", policy, ref, [prompt], optimizer, args.group_size, args.completion_tokens)
            tokens = args.completion_tokens
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    models = [policy] + ([ref] if ref is not None else [])
    row = {"stage": stage, "lora": use_lora, "layers": layers, "peak_bytes": mem.start - base + mem.peak,
           "weight_bytes": sum(_bytes(m.model.parameters()) + _bytes(m.alarm.parameters()) for m in models),
           "trainable_params": sum(p.numel() for p in trainable), "trainable_bytes": _bytes(trainable),
           "adam_state_bytes": _bytes(s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")),
           "params": sum(p.numel() for n, p in policy.model.named_parameters() if not lora.is_adapter(n)),
           "llm_params": sum(p.numel() for n, p in policy.model.named_parameters()
                             if M._is_llm(n) and not lora.is_adapter(n)),
           "tokens": tokens, "arithmetic": trained_arithmetic(stage, use_lora, real_arithmetic(layers, args.scale))}
    print(f"  real-size {stage:>4} {'LoRA' if use_lora else 'full':>4}, {layers} layers: "
          + ", ".join(f"{k} {v:,}" for k, v in row.items() if isinstance(v, int) and not isinstance(v, bool)))
    del policy, ref, optimizer, models, trainable
    gc.collect()
    return row


def _text_of(llm: M.VideoLLM, n: int) -> str:
    """A target of at least n tokens."""
    unit = "The person in the video is cooking, which is safe to imitate. "
    return unit * math.ceil(n / len(llm.tokenizer(unit)["input_ids"]))


def real_size(args) -> dict:
    """Every (stage, full / LoRA) at both --layers depths; the fit a + b·layers through the two; the extrapolation to
    the real depth; beside them the arithmetic (config numbers × bytes) and a GPU estimate."""
    real_layers = VIDEOLLAMA3_2B["text"]["num_hidden_layers"]
    with tempfile.TemporaryDirectory() as tmp:
        args.video = os.path.join(tmp, "real.mp4")
        write_video(args.video, args.frames, args.frame_size)
        tiny = M.load_model("tiny-videollama3", device="cpu", dtype=torch.float32, with_alarm=False)  # its processor
        warm = argparse.Namespace(**{**vars(args), "scale": 16})  # first-call costs (kernels, allocator) out of the fit
        for stage in STAGES:
            real_step(stage, True, 1, warm, tiny)
        rows = [real_step(stage, use_lora, n, args, tiny) for stage in STAGES for use_lora in (False, True)
                for n in args.layers]
    out = {"dtype": str(REAL_DTYPE).removeprefix("torch."), "scale": args.scale, "layers_measured": args.layers,
           "real_layers": real_layers, "frames": args.frames, "frame_size": args.frame_size,
           "group_size": args.group_size, "completion_tokens": args.completion_tokens, "runs": {}}
    (l1, l2) = args.layers
    for stage in STAGES:
        for use_lora in (False, True):
            key = f"{stage}_{'lora' if use_lora else 'full'}"
            r1, r2 = (next(r for r in rows if (r["stage"], r["lora"], r["layers"]) == (stage, use_lora, n))
                      for n in (l1, l2))
            b = (r2["peak_bytes"] - r1["peak_bytes"]) / (l2 - l1)  # memory = a + b·layers through both points
            a = r1["peak_bytes"] - b * l1
            arith = real_arithmetic(real_layers, args.scale)
            out["runs"][key] = {"measured": [r1, r2], "fit_a_bytes": a, "fit_b_bytes_per_layer": b,
                                "peak_bytes_extrapolated": a + b * real_layers,
                                "gpu_estimate": gpu_estimate(stage, use_lora, r1, r2, arith, real_layers)}
    out["target_lora_grpo_peak_bytes"] = 20 * 10**9
    print(real_table(out))
    return out


def trained_arithmetic(stage: str, use_lora: bool, arith: dict) -> dict:
    """What the optimizer holds, from the config numbers: trained parameters and AdamW's m and v in their dtypes
    (the LLM's weights in REAL_DTYPE, the adapters ADAPTER_BYTES, the alarm fp32)."""
    alarm = arith["alarm"] if STAGES[stage]["train_alarm"] else 0
    llm, llm_bytes = (arith["lora"], ADAPTER_BYTES) if use_lora else (arith["llm"], REAL_DTYPE.itemsize)
    return {"trainable_params": llm + alarm, "adam_state_bytes": 2 * (llm * llm_bytes + alarm * 4)}  # m and v


def gpu_estimate(stage: str, use_lora: bool, r1: dict, r2: dict, arith: dict, layers: int) -> dict:
    """Bytes on a GPU at the real depth, two weight layouts. The activations are measured: peak − (weights, their
    gradients, AdamW states) at each depth, extrapolated linearly; the rest is arithmetic (params × bytes):
      as_code_runs  today's code: every weight fp32 (training.load_for_training; bf16 only in autocast), so per
                    trained parameter 4 (weight) + 4 (gradient) + 8 (AdamW m, v fp32) bytes, 4 per frozen one;
      bf16_base     frozen weights bf16 (2 bytes), the trained ones as the optimizer needs: full fine-tuning bf16
                    weight + bf16 gradient + fp32 m, v (2 + 2 + 8), LoRA adapters and alarm fp32 (4 + 4 + 8)."""
    def static(r):
        return r["weight_bytes"] + r["trainable_bytes"] + r["adam_state_bytes"]  # gradients: as big as the weights
    act = [r["peak_bytes"] - static(r) for r in (r1, r2)]
    act_real = act[0] + (act[1] - act[0]) / (r2["layers"] - r1["layers"]) * (layers - r1["layers"])
    one_model = arith["llm"] + (r1["params"] - r1["llm_params"]) + arith["alarm"]  # + vision encoder and projector
    base_trained = 0 if use_lora else arith["llm"]
    small_trained = (arith["alarm"] if STAGES[stage]["train_alarm"] else 0) + (arith["lora"] if use_lora else 0)
    copies = 2 if stage == "grpo" else 1  # GRPO also holds π_ref, frozen
    frozen = copies * one_model - base_trained - (arith["alarm"] if STAGES[stage]["train_alarm"] else 0)
    return {"activations_bytes": act_real, "params_one_model": one_model, "frozen_params": frozen,
            "trained_params": base_trained + small_trained,
            "as_code_runs": frozen * 4 + (base_trained + small_trained) * 16 + act_real,
            "bf16_base": frozen * 2 + base_trained * 12 + small_trained * 16 + act_real}  # adapters kept fp32


def real_table(out: dict) -> str:
    gb = lambda b: f"{b / 10**9:.2f}"
    l1, l2 = out["layers_measured"]
    lines = [f"\nVideoLLaMA3-2B architecture (width / {out['scale']}), random {out['dtype']} weights, on CPU: one step, "
             f"{out['frames']} frames {out['frame_size']}, GRPO G = {out['group_size']}, {out['completion_tokens']} "
             f"tokens (GB = 10^9 bytes)", "",
             f"| step | measured peak, {l1} layers | {l2} layers | fit a + b·layers | {out['real_layers']} layers "
             "(extrapolated) | trained params | AdamW states | GPU: as the code runs (fp32) | GPU: bf16 base |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, run in out["runs"].items():
        r1, r2 = run["measured"]
        g = run["gpu_estimate"]
        lines.append(f"| {key} | {gb(r1['peak_bytes'])} | {gb(r2['peak_bytes'])} | {gb(run['fit_a_bytes'])} + "
                     f"{gb(run['fit_b_bytes_per_layer'])}·L | {gb(run['peak_bytes_extrapolated'])} | "
                     f"{g['trained_params']:,} | {gb(r2['adam_state_bytes'])} ({l2} layers) | {gb(g['as_code_runs'])} | "
                     f"{gb(g['bf16_base'])} |")
    lora_grpo = out["runs"]["grpo_lora"]["gpu_estimate"]
    lines.append(f"\nLoRA GRPO step on a GPU, target <= 20 GB: as the code runs {gb(lora_grpo['as_code_runs'])} GB, "
                 f"with a bf16 frozen base {gb(lora_grpo['bf16_base'])} GB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
