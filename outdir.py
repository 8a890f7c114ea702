"""outdir.py: a run's output folder, shared by the training stages and eval.py.

- `lock(out)`: one run per folder. Two runs writing the same predictions.jsonl or the same snapshots would
  both do all the work and interleave their lines. The lock is a file OUT/.lock created with O_CREAT|O_EXCL
  (atomic on every local file system) holding the owner's pid and host; it is removed when the process exits.
  A lock whose process is gone (killed with SIGKILL, the machine rebooted) is stale and taken over, so a
  crash never blocks the next run.
- `read_jsonl(path, repair=False)`: the rows of an append-only JSONL file (predictions.jsonl, metrics.jsonl),
  read as bytes: a process killed mid-write leaves a torn last line, possibly ending inside a multi-byte UTF-8
  character, which is dropped. Only the file's owner (the run holding the folder's lock, about to append to it)
  passes repair=True to cut it from the file, so appending resumes on a clean line; any other reader (eval
  --compare, --rejudge's source run, plots.py) leaves the file untouched, as a live writer may still be
  finishing that line.
- `truncate_after(path, keep)`: cut a JSONL log after the last row `keep` accepts (a resumed run continues its
  log from the snapshot's step instead of repeating the steps done after it).
"""

from __future__ import annotations

import atexit
import json
import os
import socket

LOCK_FILE = ".lock"


class OutputBusy(RuntimeError):
    """Another live run holds the output folder. One clear line."""


def _alive(pid: int) -> bool:
    """Whether the process holding a lock still runs. A killed process not yet reaped by its parent (a zombie:
    e.g. a SIGKILLed torchrun worker) still answers kill(pid, 0) but holds nothing: dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    fields = proc_stat(pid)
    return fields is None or fields[0] != "Z"  # no /proc (macOS): kill's answer stands


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the process name (state, ppid, ...); None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:  # "pid (name) state ppid ...": the name may hold spaces and ')'
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields if len(fields) >= 2 else None


def check_folder(out: str, what: str = "--out") -> None:
    """`out` must be a folder or not exist yet (checked before any model is loaded)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{what} {out} is a file, not a folder; pass a folder path")


def lock(out: str, what: str = "--out", name: str = LOCK_FILE) -> str:
    """Take OUT/.lock (or OUT/<name>: one per shard of a sharded build) for this process, creating OUT; OutputBusy
    if a live process holds it. Released at exit."""
    check_folder(out, what)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):  # a stale lock is removed and the creation retried (another run may win the race)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
            except (OSError, ValueError):  # half-written by a process killed right after creating it
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if pid == me["pid"] and host == me["host"]:
                return path  # this process already holds it (eval's video and no-video passes)
            if isinstance(pid, int) and (host != me["host"] or _alive(pid)):
                raise OutputBusy(f"{what} {out} is in use by another run (pid {pid} on {host}, lock {path}); wait for "
                                 "it to finish or pass another --out (if that run is gone, delete the lock)") from None
            try:
                os.remove(path)  # stale: its process is gone
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release, out, name)
        return path
    raise OutputBusy(f"{what} {out}: could not take the lock {path}")


def release(out: str, name: str = LOCK_FILE) -> None:
    """Remove OUT/.lock (or OUT/<name>) if this process holds it (and only then)."""
    path = os.path.join(out, name)
    try:
        with open(path) as f:
            if json.load(f).get("pid") != os.getpid():
                return
        os.remove(path)
    except (OSError, ValueError):
        pass


def changed_settings(old: dict, new: dict, keys) -> list[str]:
    """"--flag old, now new" for each of `keys` whose value differs: why a resume into this folder is refused."""
    return [f"--{k.replace('_', '-')} {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def read_jsonl(path: str, repair: bool = False) -> list[dict]:
    """The rows of an append-only JSONL file; [] if it does not exist. A torn last line (one that is not valid
    UTF-8 JSON) is dropped; a bad line elsewhere is dropped too. The file is never written unless repair=True,
    which only the run that owns the file (holds its folder's lock) may ask for: then a torn line is cut from the
    file and a last line without its newline is ended with one, so the owner's appends start on a clean line.
    A reader that does not own the file must not repair it: a live writer's later lines would be lost."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    rows, cut, pos = [], False, 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        end = len(raw) if nl < 0 else nl + 1
        line, pos = raw[pos:end], end
        try:
            row = json.loads(line.decode("utf-8")) if line.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError):  # torn: cut mid-line, maybe mid-character
            row, cut = None, True
        if row is not None:
            rows.append(row)
    if repair and (cut or (raw and not raw.endswith(b"\n"))):
        _rewrite(path, rows)
    return rows


def _rewrite(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


def truncate_after(path: str, keep) -> int:
    """Cut the JSONL file at `path` after its last row for which keep(row) is true (rows after it are dropped);
    return how many rows were dropped. Nothing is cut when no row matches (the log is kept whole)."""
    rows = read_jsonl(path, repair=True)  # the owner's log (training's open_log on resume)
    last = max((i for i, r in enumerate(rows) if keep(r)), default=None)
    if last is None or last == len(rows) - 1:
        return 0
    _rewrite(path, rows[:last + 1])
    return len(rows) - last - 1
