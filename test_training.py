"""training.py's promises, end to end: a run killed with SIGKILL and resumed ends with the weights (and, for GRPO,
the logged steps) of an uninterrupted one; a non-finite loss stops the run and keeps the last good snapshot."""

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
import model as M
import training as T
from conftest import GRPO, HERE, ONE_THREAD, SFT, checkpoint_weights, run_script

# -----------------------------------------------------------------------------
# AT-SFT


def test_killed_run_resumes_to_the_samecheckpoint_weights(demo_dir, tmp_path):
    args = ["--data", f"{demo_dir}/at_sft.jsonl", *SFT, "--epochs", "3", "--save-every", "2"]  # 6 steps
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert run_script("at_sft.py", *args, "--out", full).returncode == 0

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

    r = run_script("at_sft.py", *args, "--out", killed, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    a, b = checkpoint_weights(full), checkpoint_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# GRPO


def test_grpo_killed_run_resumes_to_the_samecheckpoint_weights(demo_dir, tmp_path):
    args = ["--data", f"{demo_dir}/grpo.jsonl", *GRPO, "--max-steps", "5", "--save-every", "2"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert run_script("grpo.py", *args, "--out", full, env=ONE_THREAD).returncode == 0

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

    r = run_script("grpo.py", *args, "--out", killed, "--resume", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    a, b = checkpoint_weights(full), checkpoint_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = lambda out: [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "step" in r]
    keep = lambda r: {k: v for k, v in r.items() if not k.startswith("s_")}  # all but the timings
    assert [keep(r) for r in steps(full)] == [keep(r) for r in steps(killed)]  # before the kill, then after the resume


# -----------------------------------------------------------------------------
# non-finite loss


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
    with pytest.raises(T.TrainingError, match="step 3: non-finite"):
        at_sft.main(["--data", f"{demo_dir}/at_sft.jsonl", "--out", out, *SFT, "--epochs", "3", "--save-every", "1"])
    snap = T.find_train_state(os.path.join(out, "resume"))
    assert json.load(open(os.path.join(snap, M.META_FILE)))["resume_state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in load_file(os.path.join(snap, "model.safetensors")).values())


def test_report_to_tensorboard_writes_the_logged_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = T.open_log(str(tmp_path), {"report_to": "tensorboard"})
    log({"step": 1, "of": 2, "phase": "sft", "loss": 2.5, "acc_v": 0.25, "ok": True})
    log({"step": 2, "of": 2, "phase": "sft", "loss": 1.5, "acc_v": 0.75, "ok": True})
    log({"summary": {"loss": 9.0}})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["sft/acc_v", "sft/loss"]  # booleans, step, of, summary left out
    assert [(e.step, e.value) for e in events.Scalars("sft/loss")] == [(1, 2.5), (2, 1.5)]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"config": {"report_to": "tensorboard"}} and rows[2]["loss"] == 1.5  # the JSONL log as always


def test_tensorboard_after_a_resume_has_every_step_once(tmp_path):
    """A run killed after logging steps 1-3 of phase lm, resumed from its snapshot at lm step 2: the board shows the
    log as cut and continued (alarm 1-3, lm 1-2 then the new 3), no step twice, the other phase's steps kept."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = T.open_log(str(tmp_path), {"report_to": "tensorboard"})
    for phase in ("alarm", "lm"):
        for step in (1, 2, 3):
            first({"step": step, "of": 4, "phase": phase, "loss": float(10 * (phase == "lm") + step)})
    again = T.open_log(str(tmp_path), {"report_to": "tensorboard"}, resume={"step": 2, "phase": "lm"})
    again({"step": 3, "of": 4, "phase": "lm", "loss": 33.0})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("alarm/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [(e.step, e.value) for e in events.Scalars("lm/loss")] == [(1, 11.0), (2, 12.0), (3, 33.0)]


def test_report_to_tensorboard_without_it_says_how(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    log = T.open_log(str(tmp_path), {"report_to": "tensorboard"})
    log({"step": 1, "of": 1, "loss": 1.0})
    assert "pip install tensorboard" in capsys.readouterr().out
    assert not (tmp_path / "tensorboard").exists() and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
