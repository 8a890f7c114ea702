"""Reliability: bad input gives one clear line (or is skipped by name), a killed run resumes to the same
weights, a non-finite loss stops the run and keeps the last good snapshot."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import at_sft
import grpo
import model as M

HERE = os.path.dirname(os.path.abspath(__file__))
SFT = ["--batch-size", "3", "--grad-accum", "1", "--lr-llm", "3e-3", "--lr-alarm", "3e-2", "--lr-heads", "3e-2",
       "--eval-records", "0"]


def _run(script, *args, timeout=300, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE, env=env)


def _weights(out):
    w = load_file(os.path.join(out, "model.safetensors"))
    w.update({"alarm." + k: v for k, v in load_file(os.path.join(out, M.ALARM_FILE)).items()})
    return w


@pytest.fixture
def bad_data(demo_dir, tmp_path):
    """An AT-SFT file with good rows and three bad ones: malformed JSON, a missing video, an undecodable video."""
    rows = [json.loads(x) for x in open(os.path.join(demo_dir, "at_sft.jsonl"))]
    for r in rows:
        r["video"] = os.path.join(demo_dir, r["video"])  # absolute: the file lives elsewhere
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    missing = dict(rows[1], id="missing-video", video=str(tmp_path / "nope.mp4"))
    broken = dict(rows[2], id="broken-video", video=str(garbage))
    lines = [json.dumps(r) for r in rows[:3]] + ['{"id": "oops", "query": ', json.dumps(missing), json.dumps(broken)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines + [json.dumps(r) for r in rows[3:]]) + "\n")
    return str(path)


def test_bad_input_one_line_and_nonzero_exit(bad_data, demo_dir, tmp_path):
    r = _run("at_sft.py", "--data", bad_data, "--out", str(tmp_path / "o"), *SFT, "--max-steps", "1")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "bad input" in last and "bad.jsonl:4" in last and "malformed JSON" in last

    r = _run("eval.py", "--data", bad_data, "--out", str(tmp_path / "e"), "--max-new-tokens", "4")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "bad.jsonl:4" in r.stderr

    r = _run("at_sft.py", "--data", bad_data, "--out", str(tmp_path / "o"), *SFT, "--max-steps", "1", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr  # --debug shows it


def test_skip_bad_records_names_them(bad_data, tmp_path):
    out = str(tmp_path / "skip")
    summary = at_sft.main(["--data", bad_data, "--out", out, *SFT, "--epochs", "1", "--skip-bad-records"])
    assert summary["skipped_records"] == 3
    text = " ".join(summary["skipped"])
    assert "bad.jsonl:4" in text and "missing-video" in text and "broken-video" in text
    assert "nope.mp4" in text and "garbage.mp4" in text  # named with their paths; never replaced


def test_killed_run_resumes_to_the_same_weights(demo_dir, tmp_path):
    args = ["--data", f"{demo_dir}/at_sft.jsonl", *SFT, "--epochs", "3", "--save-every", "2"]  # 6 steps
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert _run("at_sft.py", *args, "--out", full).returncode == 0

    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "at_sft.py"), *args, "--out", killed], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = os.path.join(killed, "resume", M.META_FILE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # wait for the step-2 snapshot, then kill -9
        if os.path.isfile(meta) and json.load(open(meta))["resume_state"]["step"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.isfile(os.path.join(killed, "model.safetensors"))  # no final checkpoint yet

    r = _run("at_sft.py", *args, "--out", killed, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# GRPO: the tiny model with small groups and short completions (its random completions score 0, but the KL term and
# AdamW still move every weight, so a resume that differed in any way would show). One thread per process: the
# tiny model's matrices are too small for more to help, and on a busy machine they cost more than half the time.
GRPO = ["--model", "tiny-videollama3", "--group-size", "2", "--batch-size", "2", "--max-completion-length", "6",
        "--lr", "1e-3", "--device", "cpu"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_grpo_bad_input_one_line_and_skip(bad_data, tmp_path):
    r = _run("grpo.py", "--data", bad_data, "--out", str(tmp_path / "o"), *GRPO, env=ONE_THREAD)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("grpo.py: bad input") and "bad.jsonl:4" in last and "malformed JSON" in last

    # 7 prompts left after loading (6 good + the undecodable video), all of them in the one step
    out = str(tmp_path / "skip")
    summary = grpo.main(["--data", bad_data, "--out", out, *GRPO, "--batch-size", "7", "--max-steps", "1",
                         "--max-completion-length", "2", "--beta", "0", "--skip-bad-records"])
    assert summary["skipped_records"] == 3
    text = " ".join(summary["skipped"])
    assert "bad.jsonl:4" in text and "nope.mp4" in text and "broken-video" in text and "garbage.mp4" in text
    step = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))][1]
    assert step["step"] == 1 and 0 < step["completion_len"] <= 2  # the 6 good prompts; the broken one counts nowhere


def test_grpo_killed_run_resumes_to_the_same_weights(demo_dir, tmp_path):
    args = ["--data", f"{demo_dir}/grpo.jsonl", *GRPO, "--max-steps", "5", "--save-every", "2"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert _run("grpo.py", *args, "--out", full, env=ONE_THREAD).returncode == 0

    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "grpo.py"), *args, "--out", killed], cwd=HERE,
                            env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = os.path.join(killed, "resume", M.META_FILE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not os.path.isfile(meta):  # the step-2 snapshot
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.isfile(os.path.join(killed, "model.safetensors"))  # no final checkpoint yet

    r = _run("grpo.py", *args, "--out", killed, "--resume", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = lambda out: [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "step" in r]
    keep = lambda r: {k: v for k, v in r.items() if not k.startswith("s_")}  # all but the timings
    assert [keep(r) for r in steps(full)] == [keep(r) for r in steps(killed)]  # before the kill, then after the resume


def test_non_finite_loss_stops_and_keeps_last_good_snapshot(demo_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = M.VideoLLM.forward

    def poisoned(self, batch, need_lm=True):
        out = forward(self, batch, need_lm)
        calls["n"] += 1
        if calls["n"] == 3:  # the 3rd micro-batch = step 3
            out["lm_loss"] = out["lm_loss"] * float("nan")
        return out

    monkeypatch.setattr(M.VideoLLM, "forward", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(M.TrainingError, match="step 3: non-finite"):
        at_sft.main(["--data", f"{demo_dir}/at_sft.jsonl", "--out", out, *SFT, "--epochs", "3", "--save-every", "1"])
    snap = M.find_train_state(os.path.join(out, "resume"))
    assert json.load(open(os.path.join(snap, M.META_FILE)))["resume_state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in load_file(os.path.join(snap, "model.safetensors")).values())
