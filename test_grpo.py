"""Tests for grpo.py.

    python -m pytest -q test_grpo.py                 # all (the learning test takes about two minutes on CPU)
    python -m pytest -q test_grpo.py -k "not learns"  # the fast ones

(Advantage, k3 KL, the clipped loss and its gradient by hand: test_grpo_loss.py.)
1. The CLI runs, logs what the method needs watched, and writes a checkpoint load_model reads.
2. On the demo data, after a quick cold start, the mean reward rises during a short GRPO run.
(The rollout's fast path is tested in test_rollout.py, the log-probs in test_model.py.)"""

import json
import math
import os
import random

import pytest
import torch

import data as D
import grpo
import model as M
import rewards as R
import training as T

def test_group_size_must_be_at_least_two():
    with pytest.raises(SystemExit):
        grpo.parse_args(["--group-size", "1", "--data", "x.jsonl"])


# -----------------------------------------------------------------------------
# 2. the command line


def test_cli_runs_logs_and_saves(demo_full, tmp_path):
    out = str(tmp_path / "grpo")
    grpo.main(["--model", "tiny-qwen2.5-vl", "--data", os.path.join(demo_full, "grpo.jsonl"), "--out", out,
               "--group-size", "2", "--batch-size", "1", "--max-completion-length", "8", "--max-steps", "2",
               "--passes", "2", "--lr", "1e-3", "--device", "cpu", "--eval-records", "0"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in rows if "step" in r]
    assert "config" in rows[0] and len(steps) == 2 and "summary" in rows[-1]
    for key in ("reward", "format_rate", "rouge", "video_acc", "text_acc", "alpha", "kl", "clip_frac",
                "completion_len", "zero_var_groups", "s_rollout", "s_update", "loss", "grad_norm", "lr"):
        assert key in steps[0] and math.isfinite(steps[0][key]), key
    assert 0.1 <= steps[0]["alpha"] <= 0.5 and steps[0]["completion_len"] <= 8
    llm = M.load_model(out, device="cpu", dtype="fp32")  # what eval.py does
    assert llm.meta["stage"] == "grpo" and llm.alarm is not None


def test_multi_turn_prompt_refused_before_the_model_loads(demo_full, tmp_path, monkeypatch):
    """A multi-turn record in GRPO's data stops the run when the data are read, not after the model loaded."""
    monkeypatch.setattr(T, "load_for_training", lambda *a, **k: pytest.fail("the model loaded before the data"))
    row = json.loads(open(os.path.join(demo_full, "grpo.jsonl")).readline())
    row["video"] = None
    path = tmp_path / "mt.jsonl"
    path.write_text(json.dumps({**row, "turns": [["And?", "No."]]}) + "\n")
    with pytest.raises(D.DataError, match=r"mt.jsonl:1 \(id .*\): a multi-turn conversation is training data"):
        grpo.main(["--model", "tiny-qwen2.5-vl", "--data", str(path), "--out", str(tmp_path / "g"),
                   "--group-size", "2", "--batch-size", "1", "--device", "cpu", "--eval-records", "0"])


def test_grpo_runs_on_image_prompts(image_files, tmp_path):
    """Image records (one and two images) as GRPO prompts: both groups are rolled out, scored and updated on, and the
    checkpoint is written (the log-probs' equality with the straightforward path is in test_rollout.py)."""
    rows = [{"id": f"im{i}", "image": paths, "query": "Is this safe?", "video_label": i, "text_label": 0,
             "target": "<think>ok</think><answer>Yes.</answer><vidType>0</vidType><textType>0</textType>"}
            for i, paths in enumerate([image_files[:1], image_files[1:]])]
    data = tmp_path / "images.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "grpo")
    summary = grpo.main(["--model", "tiny-qwen3-vl", "--data", str(data), "--out", out, "--group-size", "2",
                         "--batch-size", "2", "--max-completion-length", "4", "--max-steps", "1", "--lr", "1e-3",
                         "--device", "cpu", "--eval-records", "0"])
    step = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1]
    assert summary["steps"] == 1 and 0 < step["completion_len"] <= 4 and math.isfinite(step["grad_norm"])
    assert math.isfinite(step["reward"]) and "skipped_records" not in summary
    assert M.load_model(out, device="cpu", dtype="fp32").meta["stage"] == "grpo"


# -----------------------------------------------------------------------------
# 3. it learns


def _quick_cold_start(demo_dir: str, out: str, lr: float = 3e-3, target_format_rate: float = 0.3) -> tuple[str, float]:
    """A few lines of supervised cold start, stopped once sampled completions (temperature 1, as in GRPO) have
    the structured format about `target_format_rate` of the time: GRPO then has room to improve and variance to
    learn from. Stopping on the measured rate, not after a fixed number of steps, keeps the test meaningful
    when the prompts or the demo data change."""
    T.seed_everything(0)
    llm = M.load_model("tiny-videollama3", device="cpu", dtype="fp32")
    M.set_trainable(llm, train_llm=True, train_alarm=False, train_heads=False)
    optimizer = torch.optim.AdamW([p for p in llm.llm_parameters() if p.requires_grad], lr=lr)
    records, rng = D.load_records(os.path.join(demo_dir, "cold_start.jsonl")), random.Random(0)
    probe = D.collate(llm, D.load_records(os.path.join(demo_dir, "grpo.jsonl"))[:8] * 4, structured=True, with_target=False)
    llm.model.train()
    for step in range(1, 301):
        llm.forward(D.collate(llm, rng.sample(records, 8), structured=True, with_target=True))["lm_loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 40 and step % 5 == 0:
            texts = M.generate(llm, probe, max_new_tokens=96, do_sample=True, temperature=1.0, top_p=0.95)[1]
            rate = sum(map(R.format_reward, texts)) / len(texts)
            if rate >= target_format_rate:
                break
    M.save_checkpoint(llm, out, meta={"stage": "cold_start", "step": step})
    return out, rate


def test_grpo_learns_on_demo(demo_full, tmp_path):
    start, rate = _quick_cold_start(demo_full, str(tmp_path / "cold_start"))
    assert rate >= 0.3, "the quick cold start did not learn the format in 300 steps"
    out = str(tmp_path / "grpo")
    grpo.main(["--model", start, "--data", os.path.join(demo_full, "grpo.jsonl"), "--out", out, "--seed", "0",
               "--group-size", "4", "--batch-size", "8", "--max-completion-length", "96", "--lr", "2e-4",
               "--passes", "2", "--epochs", "5", "--max-steps", "60", "--device", "cpu", "--eval-records", "0"])
    steps = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "step" in r]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    first, last = mean(steps[:10], "reward"), mean(steps[-10:], "reward")  # 320 completions each
    # Seen: +0.43 and +0.51 (seeds 0, 1); one step's mean over 32 completions has a spread of about 0.3.
    assert last > first + 0.25, f"mean reward, first 10 steps {first:.3f}, last 10 steps {last:.3f}"
    assert mean(steps[-10:], "format_rate") > mean(steps[:10], "format_rate")
