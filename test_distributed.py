"""Several processes: torchrun + FSDP2 on CPU (gloo), the tiny model, 2 processes.

Each stage run by `torchrun --nproc_per_node 2` with --grad-accum A must give what one process gives with
--grad-accum 2A (the same global batch, the same records in the same micro-batches): the same logged losses
step by step, the same final weights, a checkpoint that loads in one process without torchrun, and snapshots
that resume under the other world size. GRPO on 2 processes (2 of a step's 4 prompts each, whole groups) must
give what one process gives with the same 4 prompts per step. Skip with `-m "not distributed"`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import model as M
import outdir
import rewards

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
SFT = ["--batch-size", "3", "--lr-llm", "3e-3", "--lr-alarm", "3e-2", "--lr-heads", "3e-2", "--warmup-ratio", "0"]
RTOL, ATOL = 1e-4, 1e-5  # logged numbers are rounded to 5 decimals


def _cmd(script: str, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, os.path.join(HERE, script)]
    with socket.socket() as s:  # a free port for this run's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(port), os.path.join(HERE, script)]


# torchrun sets OMP_NUM_THREADS=1 in each of its processes; a 1-process run must use one thread too, or its matmuls sum
# in another order, and AdamW turns that rounding into a whole step (lr) wherever a weight's gradient nearly cancels.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(script: str, *args, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(_cmd(script, nproc) + list(args), capture_output=True, text=True, timeout=timeout, cwd=HERE,
                       env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _killed_after_first_snapshot(script: str, *args, out: str, nproc: int) -> None:
    """Start a run, SIGKILL it (every process of it) as soon as its first resumable snapshot is complete."""
    proc = subprocess.Popen(_cmd(script, nproc) + list(args) + ["--out", out], cwd=HERE, start_new_session=True,
                            env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = os.path.join(out, "resume", M.META_FILE)  # renamed in with its snapshot, so complete when it exists
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not os.path.isfile(meta):
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished (or failed) before it could be killed"
    tree = _descendants(proc.pid)  # torchrun starts each worker in a session of its own: killpg misses them
    assert nproc == 1 or len(tree) >= nproc, tree  # the workers were found
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30  # SIGKILL is asynchronous: wait until every worker is gone (or a zombie)
    while time.time() < deadline and any(outdir._alive(pid) for pid in tree):
        time.sleep(0.02)
    assert not os.path.isfile(os.path.join(out, "model.safetensors"))  # no final checkpoint yet


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        fields = outdir.proc_stat(int(name)) if name.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _steps(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "step" in r and "of" in r]


def _assert_same_steps(one: list[dict], many: list[dict]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in many]  # rank 0 alone logs: no duplicated rows
    for a, b in zip(one, many):
        for k, v in a.items():
            if isinstance(v, float) and k not in ("tok_per_s", "s_rollout", "s_update"):  # not timings
                assert b[k] == pytest.approx(v, rel=RTOL, abs=ATOL), (a["step"], k, v, b[k])


def _weights(out: str) -> dict:
    """The checkpoint's weights, loaded in this (single, non-distributed) process with model.load_model."""
    llm = M.load_model(out, device="cpu", dtype=torch.float32)
    w = {k: v.detach() for k, v in llm.model.state_dict().items()}
    w.update({"alarm." + k: v.detach() for k, v in llm.alarm.state_dict().items()})
    return w


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL, msg=k)


@pytest.fixture(scope="module")
def at_sft_args(demo_dir):
    # 6 records, global batch 3 x 2 = 6: 8 epochs = 8 steps; a snapshot every 2 steps
    return ["--data", f"{demo_dir}/at_sft.jsonl", "--eval-data", f"{demo_dir}/eval.jsonl", *SFT, "--epochs", "8",
            "--save-every", "2", "--eval-records", "6"]


@pytest.fixture(scope="module")
def one_process(at_sft_args, tmp_path_factory):
    """The reference: AT-SFT in one process, --grad-accum 2."""
    out = str(tmp_path_factory.mktemp("one") / "at_sft")
    _run("at_sft.py", *at_sft_args, "--grad-accum", "2", "--out", out)
    return out


def test_at_sft_two_processes_equal_one(one_process, at_sft_args, tmp_path):
    out = str(tmp_path / "two")
    r = _run("at_sft.py", *at_sft_args, "--grad-accum", "1", "--out", out, nproc=2)
    assert "2 processes, global batch 6" in r.stdout and r.stdout.count('"stage": "at_sft"') == 1  # rank 0 prints

    one, two = _steps(one_process), _steps(out)
    assert len(one) == 8 and one[-1]["loss"] < one[0]["loss"] - 0.5  # it learned: the equality is not vacuous
    _assert_same_steps(one, two)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert rows[0]["world_size"] == 2
    summary_one = [r for r in map(json.loads, open(os.path.join(one_process, "metrics.jsonl"))) if "summary" in r]
    got, want = rows[-1]["summary"], summary_one[-1]["summary"]  # held-out ATC accuracy, counted over both ranks
    assert got.keys() == want.keys()
    for k, v in want.items():  # the fitted thresholds are midpoints of probabilities: as close as the weights
        assert got[k] == (pytest.approx(v, rel=1e-5, abs=1e-6) if isinstance(v, float) else v), k
    _assert_same_weights(_weights(one_process), _weights(out))  # the ordinary checkpoint loads in one process


def test_snapshot_resumes_under_the_other_world_size(one_process, at_sft_args, tmp_path):
    reference = _weights(one_process)
    # written by 2 processes, resumed by 1
    out = str(tmp_path / "from_two")
    _killed_after_first_snapshot("at_sft.py", *at_sft_args, "--grad-accum", "1", out=out, nproc=2)
    r = _run("at_sft.py", *at_sft_args, "--grad-accum", "2", "--out", out, "--resume")
    assert "resuming from" in r.stdout
    _assert_same_weights(reference, _weights(out))
    # written by 1 process, resumed by 2
    out = str(tmp_path / "from_one")
    _killed_after_first_snapshot("at_sft.py", *at_sft_args, "--grad-accum", "2", out=out, nproc=1)
    r = _run("at_sft.py", *at_sft_args, "--grad-accum", "1", "--out", out, "--resume", nproc=2)
    assert "resuming from" in r.stdout
    _assert_same_weights(reference, _weights(out))
    _assert_same_steps(_steps(one_process)[-2:], _steps(out)[-2:])  # the steps after the resume


def test_cold_start_two_processes_equal_one(demo_dir, tmp_path):
    # --eval-records 1: rank 0 generates the held-out answer while rank 1 has none, so a collective inside
    # generation (a sharded forward, HF's synced_gpus) would hang or fail this test instead of passing.
    # The 2 processes also accumulate 2 micro-batches each and recompute activations (--gradient-checkpointing).
    args = ["--model", "tiny-videollama3", "--data", f"{demo_dir}/cold_start.jsonl", "--eval-data",
            f"{demo_dir}/eval.jsonl", "--batch-size", "1", "--lr-llm", "3e-3", "--warmup-ratio", "0",
            "--epochs", "2", "--eval-records", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run("cold_start.py", *args, "--grad-accum", "4", "--out", one)
    _run("cold_start.py", *args, "--grad-accum", "2", "--gradient-checkpointing", "--out", two, nproc=2)
    assert len(_steps(one)) == 3  # 6 records x 2 epochs / global batch 4
    _assert_same_steps(_steps(one), _steps(two))
    w1, w2 = _weights(one), _weights(two)
    _assert_same_weights(w1, w2)
    frozen = [k for k in w1 if k.startswith("alarm.") or not M._is_llm(k)]  # alarm, vision encoder, projector
    assert frozen and all(torch.equal(w1[k], w2[k]) for k in frozen)
    summaries = [[json.loads(x) for x in open(os.path.join(o, "metrics.jsonl"))][-1]["summary"] for o in (one, two)]
    assert summaries[0] == summaries[1]  # held-out greedy answers: the same format rate and first answer


def _with_broken_video(demo_dir: str, split: str, tmp_path) -> str:
    """A copy of a demo split with an undecodable video inserted as its third record ("broken-video")."""
    rows = [json.loads(line) for line in open(os.path.join(demo_dir, split))]
    for r in rows:
        r["video"] = os.path.join(demo_dir, r["video"])  # absolute: the copy lives elsewhere
    (tmp_path / "garbage.mp4").write_bytes(b"not a video" * 100)
    rows.insert(2, dict(rows[2], id="broken-video", video=str(tmp_path / "garbage.mp4")))
    data = tmp_path / split
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(data)


def test_rank_whose_micro_batch_is_all_bad_does_not_hang(demo_dir, tmp_path):
    """--skip-bad-records under torchrun, one record per micro-batch: the rank that draws the undecodable video
    has nothing left, yet must take part in FSDP's collectives (it runs a stand-in that adds 0); the run
    ends, names the record, and equals one process with the same global batch."""
    data = _with_broken_video(demo_dir, "cold_start.jsonl", tmp_path)
    args = ["--model", "tiny-videollama3", "--data", data, "--batch-size", "1", "--lr-llm", "3e-3",
            "--warmup-ratio", "0", "--epochs", "1", "--eval-records", "0", "--skip-bad-records"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run("cold_start.py", *args, "--grad-accum", "2", "--out", one)
    _run("cold_start.py", *args, "--grad-accum", "1", "--out", two, nproc=2, timeout=240)
    _assert_same_steps(_steps(one), _steps(two))
    summaries = [[json.loads(x) for x in open(os.path.join(o, "metrics.jsonl"))][-1]["summary"] for o in (one, two)]
    assert summaries[0]["skipped_records"] == summaries[1]["skipped_records"] == 1
    _assert_same_weights(_weights(one), _weights(two))


def rouge_anywhere(texts, references, video_labels, text_labels, **weights):
    """A GRPO stand-in reward with spread: ROUGE of the whole completion against the reference. The real reward
    gives the untrained tiny model's random completions 0 everywhere (no tags): no advantages, and nothing for the
    equivalence to check. The reward is a pure function of the text, so swapping it changes no line of grpo.py."""
    r = [rewards.rouge_reward(t, ref) for t, ref in zip(texts, references)]
    zeros = [0.0] * len(r)
    return r, {"format": zeros, "rouge": r, "video": zeros, "text": zeros, "alpha": [1.0] * len(r)}


STAND_IN = f"""import sys
sys.path.insert(0, {HERE!r})
import cli, grpo, rewards, test_distributed
rewards.safety_rewards = test_distributed.rouge_anywhere
cli.run_cli(grpo.main)
"""


def test_grpo_two_processes_equal_one(demo_dir, tmp_path):
    """GRPO, 4 prompts per step: one process takes them all; 2 processes take prompts 0, 2 (rank 0) and 1, 3
    (rank 1), each with its whole group. The data holds an undecodable video (--skip-bad-records): the rank that
    draws it (rank 1, steps 1 and 3) runs an empty group in its place. The 2-process run is killed after its
    step-3 snapshot and resumed in one process: steps 1-3 come from 2 processes, step 4 from the resumed one."""
    script = tmp_path / "grpo_stand_in.py"
    script.write_text(STAND_IN)
    data = _with_broken_video(demo_dir, "grpo.jsonl", tmp_path)
    # 7 prompts x 2 epochs / 4 per step = 4 steps; G = 3; 2 passes per rollout batch, so the clip matters
    args = ["--model", "tiny-videollama3", "--data", data, "--group-size", "3", "--batch-size", "4",
            "--max-completion-length", "8", "--epochs", "2", "--passes", "2", "--lr", "1e-3", "--warmup-ratio", "0",
            "--save-every", "3", "--skip-bad-records", "--device", "cpu", "--eval-records", "0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run(str(script), *args, "--out", one)
    _killed_after_first_snapshot(str(script), *args, out=two, nproc=2)
    r = _run(str(script), *args, "--out", two, "--resume")
    assert "resuming from" in r.stdout

    steps_one, steps_two = _steps(one), _steps(two)
    assert len(steps_one) == 4 and steps_one[0]["zero_var_groups"] < 1  # advantages: the equality is not vacuous
    assert max(s["clip_frac"] for s in steps_one) > 0
    _assert_same_steps(steps_one, steps_two)
    summaries = [[json.loads(x) for x in open(os.path.join(o, "metrics.jsonl"))][-1]["summary"] for o in (one, two)]
    assert summaries[0] == summaries[1] and summaries[0]["skipped_records"] == 1  # named, also across the resume
    w1, w2 = _weights(one), _weights(two)
    start = _weights("tiny-videollama3")
    assert all(not torch.equal(w1[k], start[k]) for k in w1 if M._is_llm(k))  # it trained every LLM weight
    _assert_same_weights(w1, w2)
