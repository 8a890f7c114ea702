"""Tests of outdir.py: one run per output folder (a live lock refuses, a stale one is taken over, the owner may take
it again), JSONL logs read whatever the last line holds, and a resumed log cut after the snapshot's step."""

import json
import os
import subprocess
import sys
import time

import pytest

import outdir


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_last_line_complete_but_without_newline_is_kept(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}')
    assert outdir.read_jsonl(str(path)) == [{"id": "a"}, {"id": "b"}]
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}'  # not the owner: untouched
    assert outdir.read_jsonl(str(path), repair=True) == [{"id": "a"}, {"id": "b"}]
    assert path.read_text().endswith("}\n")


def test_lock_live_stale_and_reentrant(tmp_path):
    out = str(tmp_path / "o")
    lock = os.path.join(out, outdir.LOCK_FILE)
    os.makedirs(out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(lock, "w") as f:
            json.dump({"pid": sleeper.pid, "host": os.uname().nodename}, f)
        with pytest.raises(outdir.OutputBusy, match=f"in use by another run \\(pid {sleeper.pid}"):
            outdir.lock(out)
    finally:
        sleeper.kill()
        sleeper.wait()
    with open(lock, "w") as f:  # its process is gone: stale, taken over
        json.dump({"pid": dead_pid(), "host": os.uname().nodename}, f)
    outdir.lock(out)
    assert json.load(open(lock))["pid"] == os.getpid()
    outdir.lock(out)  # the same process again (eval's video and no-video passes): fine
    outdir.release(out)
    assert not os.path.exists(lock)
    open(lock, "w").write("{")  # half-written by a process killed right after creating it: stale
    outdir.lock(out)
    outdir.release(out)


def test_a_killed_but_unreaped_process_holds_no_lock():
    """A SIGKILLed run's process that its parent has not reaped yet (a zombie) still answers kill(pid, 0); its lock
    is stale all the same."""
    child = subprocess.Popen(["sleep", "0"])
    deadline = time.time() + 10
    while time.time() < deadline and outdir._alive(child.pid):  # exits at once; not waited for: a zombie
        time.sleep(0.05)
    assert not outdir._alive(child.pid)
    child.wait()
    assert outdir._alive(os.getpid())


def test_check_folder_refuses_a_file(tmp_path):
    outdir.check_folder(str(tmp_path / "new"))  # not there yet: fine
    outdir.check_folder(str(tmp_path))
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="--out .* is a file, not a folder"):
        outdir.check_folder(str(tmp_path / "f"))
    with pytest.raises(FileExistsError):
        outdir.lock(str(tmp_path / "f"))


def test_truncate_after_keeps_up_to_the_last_matching_row(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"config": {}}, {"step": 1}, {"step": 2}, {"step": 3}, {"step": 2}, {"step": 4}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert outdir.truncate_after(str(log), lambda r: r.get("step") == 2) == 1  # the last step-2 row, not the first
    assert outdir.read_jsonl(str(log)) == rows[:5]
    assert outdir.truncate_after(str(log), lambda r: r.get("step") == 9) == 0  # no match: the log is kept whole
    assert outdir.read_jsonl(str(log)) == rows[:5]
    assert outdir.read_jsonl(str(tmp_path / "absent.jsonl")) == []
