"""A careless user's mistakes each get one clear line, and no run loses or doubles work: model paths, prompts
longer than the model takes, targets a stage cannot use, torn JSONL lines, two runs on one --out, a failed start
that must leave --out as it was, empty or folder videos, a resumed log that must not repeat steps."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

import at_sft
import cold_start
import data
import eval as ev
import grpo
import model as M
import outdir
import training as T
from conftest import GRPO, ONE_THREAD, SFT, run_script
from data import DataError
from test_data import good  # noqa: F401, F811  (the fixture: a valid row whose video sits beside the JSONL)

STRUCTURED = "<think>t</think><answer>a</answer><vidType>0</vidType><textType>0</textType>"


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


def demo_rows(demo_dir, split, n=None):
    rows = [json.loads(x) for x in open(os.path.join(demo_dir, f"{split}.jsonl"))][:n]
    for r in rows:
        if r.get("video"):
            r["video"] = os.path.join(demo_dir, r["video"])
    return rows


# -----------------------------------------------------------------------------
# 2. model paths


def test_model_paths_say_what_is_wrong(tmp_path):
    cases = {
        str(tmp_path / "nope" / "at_sft"): "not found: no such folder; run at_sft.py first",
        str(tmp_path / "x" / "y"): "not found: no such folder; check the path",
        str(tmp_path): "is a folder without config.json",
        "ckpts/cold_start": "not found: no such folder; run cold_start.py first",  # one slash: not taken for org/name
        "my model": "not a Hugging Face hub id either",
        "a..b": "not a Hugging Face hub id either",
    }
    (tmp_path / "weights.bin").write_bytes(b"0")
    cases[str(tmp_path / "weights.bin")] = "is a file"
    for path, needle in cases.items():
        with pytest.raises(OSError) as e:
            M.check_model_path(path, "--model")
        assert needle in str(e.value) and path in str(e.value)
    (tmp_path / "run" / "resume").mkdir(parents=True)  # a run killed before its final checkpoint
    with pytest.raises(OSError, match="unfinished run's snapshot in resume/"):
        M.check_model_path(str(tmp_path / "run"))
    M.check_model_path("Qwen/Qwen2.5-VL-3B-Instruct")  # may be a hub id: left to from_pretrained
    M.check_model_path("tiny-videollama3")


def test_cold_start_before_at_sft_says_run_at_sft_first(demo_dir, tmp_path):
    """cold_start.py's default --model is at_sft.py's default --out; run in a fresh folder it does not exist."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cold_start.py")
    r = subprocess.run([sys.executable, script, "--data", os.path.join(demo_dir, "cold_start.jsonl"),
                        "--eval-data", os.path.join(demo_dir, "eval.jsonl")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "runs/demo/at_sft not found" in r.stderr and "run at_sft.py first" in r.stderr
    assert not (tmp_path / "runs" / "demo" / "cold_start").exists()  # nothing written


def test_out_that_is_a_file_refused_before_the_model_loads(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "load_for_training", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    out.write_text("a file")
    for main, split, extra in ((at_sft.main, "at_sft", SFT), (grpo.main, "grpo", GRPO)):
        with pytest.raises(FileExistsError, match="is a file, not a folder"):
            main(["--data", os.path.join(demo_dir, f"{split}.jsonl"), "--out", str(out), *extra])


# -----------------------------------------------------------------------------
# 3. prompts longer than the model takes


def test_too_long_prompt_is_named_or_skipped(llm, demo_dir, tmp_path):
    rows = demo_rows(demo_dir, "eval", 2)
    long = dict(rows[1], id="long-one", query="why " * 6000)  # ~6,000+ tokens; the tiny models take 4,096
    recs = data.load_records(write_jsonl(tmp_path / "long.jsonl", [rows[0], long]))
    limit = data.max_length(llm)
    assert limit == 4096
    with pytest.raises(DataError) as e:
        data.collate(llm, recs, structured=True, with_target=False, max_new_tokens=768)
    msg = str(e.value)
    assert "long-one" in msg and f"{limit} tokens less 768 for the answer = {limit - 768}" in msg
    assert rows[0]["id"] not in msg  # only the record that is too long
    skipped = {}
    batch = data.collate(llm, recs, structured=True, with_target=False, max_new_tokens=768, skip_bad=True,
                         skipped=skipped)
    assert [r.id for r in batch["records"]] == [rows[0]["id"]] and "long-one" in " ".join(skipped.values())
    # a prompt that fits alone but not with the generation budget is bad too; without a budget it passes
    n = int(data.collate(llm, recs[:1], structured=True, with_target=False)["attention_mask"].sum())
    with pytest.raises(DataError, match="too long"):
        data.collate(llm, recs[:1], structured=True, with_target=False, max_new_tokens=limit - n + 1)
    data.collate(llm, recs[:1], structured=True, with_target=False, max_new_tokens=limit - n)


def test_eval_stops_on_a_too_long_query_before_generating(demo_dir, tmp_path):
    rows = demo_rows(demo_dir, "eval", 3)
    rows[1] = dict(rows[1], id="huge", query="x" * 200_000)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "e"
    r = run_script("eval.py", "--data", path, "--out", str(out), "--max-new-tokens", "4", env=ONE_THREAD)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "huge" in r.stderr.strip().splitlines()[-1] and "too long for the model" in r.stderr
    r = run_script("eval.py", "--data", path, "--out", str(out), "--max-new-tokens", "4", "--batch-size", "1",
                   "--skip-bad-records", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    m = json.load(open(out / "metrics.json"))
    assert m["n"] == 2 and m["skipped_records"] == 1 and "huge" in m["skipped"][0]


# -----------------------------------------------------------------------------
# 4. targets the stage cannot use


def test_stages_that_need_structured_targets_say_so(demo_dir, tmp_path):
    rows = demo_rows(demo_dir, "cold_start", 4)
    rows[2] = dict(rows[2], id="plain", target="Just an answer.")
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data.load_records(path)  # AT-SFT takes any target
    with pytest.raises(DataError, match=r"d.jsonl:3 \(id plain\): target is not in the structured format"):
        data.load_records(path, structured=True)
    skipped = {}
    recs = data.load_records(path, structured=True, skip_bad=True, skipped=skipped)
    assert [r.id for r in recs] == [rows[i]["id"] for i in (0, 1, 3)] and len(skipped) == 1
    for main, extra in ((cold_start.main, SFT), (grpo.main, GRPO)):
        with pytest.raises(DataError, match="id plain"):
            main(["--model", "tiny-videollama3", "--data", path, "--out", str(tmp_path / main.__module__), *extra])


def test_eval_reward_leaves_out_records_without_a_structured_reference(capsys):
    recs = [data.Record(id=i, video=None, query="q", target=t, video_label=0, text_label=0, subset="SafeQ")
            for i, t in (("a", STRUCTURED), ("b", "plain answer"))]
    verdict = {"safe": True, "refusal": False, "score": None, "source": "rule"}
    preds = [{"id": r.id, "response": STRUCTURED, "judge": verdict} for r in recs]
    m = ev.compute_metrics(preds, recs)
    assert m["mean_reward"] == ev.compute_metrics(preds[:1], recs[:1])["mean_reward"]  # b counts nowhere in it
    assert m["format_rate"] == 1.0 and m["n"] == 2  # ... and everywhere else
    ev.note_unstructured(recs, None)
    assert "1 of 2 records" in capsys.readouterr().out
    ev.note_unstructured(recs, "figstep")  # a benchmark has no references: nothing to say
    assert capsys.readouterr().out == ""


# -----------------------------------------------------------------------------
# 5. torn lines


@pytest.mark.parametrize("cut", [1, 2, 5])  # inside a 3-byte character, after it, inside the JSON
def test_torn_utf8_last_line_is_dropped_and_cut(tmp_path, cut):
    rows = [{"id": "a", "response": "好的"}, {"id": "b", "response": "抱歉，我不能"}]
    whole = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    torn = json.dumps({"id": "c", "response": "暴力会严重伤害"}, ensure_ascii=False).encode()
    at = torn.index("严".encode()) + cut
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(whole + torn[:at])
    assert ev.read_predictions(str(path)) == rows
    assert path.read_bytes() == whole + torn[:at]  # a reader that does not own the file leaves it as it is
    assert ev.read_predictions(str(path), repair=True) == rows  # the owner (holding the --out lock) cuts it
    assert path.read_bytes() == whole  # cut at the last good newline: appending resumes on a clean line
    assert ev.read_predictions(str(path)) == rows


def test_readers_that_do_not_own_a_file_never_rewrite_it(tmp_path):
    """eval --compare, --rejudge's source run and plots.py read files another run may still be appending to:
    they ignore a torn last line and leave the file byte-identical (repairing it would lose the writer's next
    lines). Only the owner's paths repair: eval's resume, truncate_after (training's resumed log)."""
    import plots

    log = tmp_path / "metrics.jsonl"
    raw = ('{"config": {}}\n{"step": 1, "loss": 0.5}\n' + '{"step": 2, "loss": 0.4').encode()
    log.write_bytes(raw)
    assert [r["step"] for r in plots.step_rows(str(log))] == [1]
    assert outdir.read_jsonl(str(log)) == [{"config": {}}, {"step": 1, "loss": 0.5}]
    assert log.read_bytes() == raw
    src = tmp_path / "src"
    src.mkdir()
    (src / "predictions.jsonl").write_bytes(b'{"id": "a"}\n{"id": "b", "respo')
    assert ev.read_predictions(str(src / "predictions.jsonl")) == [{"id": "a"}]
    assert (src / "predictions.jsonl").read_bytes() == b'{"id": "a"}\n{"id": "b", "respo'
    assert outdir.truncate_after(str(log), lambda r: r.get("step") == 1) == 0  # the owner: cut on its way
    assert log.read_bytes() == b'{"config": {}}\n{"step": 1, "loss": 0.5}\n'


# -----------------------------------------------------------------------------
# 8. one run per --out


def test_second_eval_on_the_same_out_stops_at_once(demo_dir, tmp_path):
    """Two evals on one folder: the second stops with one line while the first runs, and writes nothing; the first
    is then killed with SIGKILL (its lock stays behind, stale) and a rerun resumes past it."""
    rows = [dict(r, id=f"{r['id']}-{k}") for k in range(10) for r in demo_rows(demo_dir, "eval")]  # 60 records
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = str(tmp_path / "e")
    args = ["--data", path, "--out", out, "--max-new-tokens", "32", "--batch-size", "1"]
    first = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "eval.py"), *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    try:
        lock = os.path.join(out, outdir.LOCK_FILE)
        deadline = time.time() + 120
        while not os.path.exists(lock) and time.time() < deadline and first.poll() is None:
            time.sleep(0.02)
        second = run_script("eval.py", *args, env=ONE_THREAD)
        assert first.poll() is None, "the first eval ended before the second started; nothing was tested"
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"--out {out} is in use by another run (pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()
    ids = [p["id"] for p in ev.read_predictions(os.path.join(out, "predictions.jsonl"))]
    assert len(ids) == len(set(ids))  # the second wrote nothing
    assert os.path.exists(lock)  # SIGKILL: no exit handler ran
    r = run_script("eval.py", *args, "--limit", "1", env=ONE_THREAD)  # stale lock taken over
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(lock)


def test_training_stage_refuses_a_locked_out(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "load_for_training", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "o"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / outdir.LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        with pytest.raises(outdir.OutputBusy):
            at_sft.main(["--data", os.path.join(demo_dir, "at_sft.jsonl"), "--out", str(out), *SFT])
    finally:
        sleeper.kill()
        sleeper.wait()


# -----------------------------------------------------------------------------
# 9. a failed start leaves --out as it was


def test_failed_eval_start_writes_nothing_and_the_fixed_rerun_runs(demo_dir, tmp_path):
    rows = demo_rows(demo_dir, "eval", 2)
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], dict(rows[1], video_label=7)])
    out = tmp_path / "e"
    common = ["--out", str(out), "--max-new-tokens", "2", "--limit", "2"]
    r = run_script("eval.py", "--data", bad, *common, env=ONE_THREAD)
    assert r.returncode == 2 and not (out / "config.json").exists()
    fixed = write_jsonl(tmp_path / "bad.jsonl", rows)  # the same file, corrected
    r = run_script("eval.py", "--data", fixed, *common, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert json.load(open(out / "metrics.json"))["n"] == 2


def test_a_start_that_fails_after_its_config_does_not_block_the_corrected_rerun(demo_dir, tmp_path):
    """A model that does not load, or a judge that cannot be reached, fails after eval.py wrote its config (and
    maybe an empty predictions.jsonl): that config holds no prediction, so the rerun with other settings into the
    same --out replaces it instead of refusing "a run with other settings"."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # passes check_model_path, fails in from_pretrained
    out = tmp_path / "e"
    common = ["--data", os.path.join(demo_dir, "eval.jsonl"), "--out", str(out), "--max-new-tokens", "2",
              "--limit", "2", "--batch-size", "2", "--device", "cpu"]
    with pytest.raises(Exception):
        ev.main([*common, "--model", str(broken)])
    assert (out / "config.json").exists()  # the failed start's config
    # a judge that cannot be reached: fails at its first request, after the predictions file was opened
    with pytest.raises((Exception, SystemExit)):
        ev.main([*common, "--judge", "openai", "--judge-url", "http://127.0.0.1:9/v1", "--judge-retries", "0",
                 "--judge-timeout", "2"])
    assert json.load(open(out / "config.json"))["judge"] == "openai"
    assert not ev.read_predictions(str(out / "predictions.jsonl"))
    ev.main(common)  # the corrected rerun: the right model, the rule judge, the same --out
    assert json.load(open(out / "metrics.json"))["n"] == 2
    assert json.load(open(out / "config.json"))["model"] == "tiny-videollama3"
    with pytest.raises(SystemExit, match="other settings"):  # a config beside predictions still guards them
        ev.main([*common, "--max-new-tokens", "3"])


@pytest.mark.parametrize("argv", [["--dtype", "fp64"], ["--judge", "gpt4"], ["--judge", "hf:"]])
def test_bad_dtype_and_judge_are_refused_when_parsed(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ev.parse_args(argv)
    assert e.value.code == 2 and repr(argv[1]) in capsys.readouterr().err  # one usage line, no KeyError
    assert ev.parse_args(["--dtype", "bf16", "--judge", "hf:Qwen/Qwen3Guard-Gen-0.6B"]).dtype == "bf16"


# -----------------------------------------------------------------------------
# 10. smaller: empty and folder videos, the resumed log


def test_empty_video_and_folder_video(tmp_path, good, capfd):  # noqa: F811
    (tmp_path / "videos" / "empty.mp4").write_bytes(b"")
    (tmp_path / "videos" / "clip.mp4").mkdir()
    for video, needle in (("videos/empty.mp4", "is empty (0 bytes)"), ("videos/clip.mp4", "is a directory")):
        path = write_jsonl(tmp_path / "d.jsonl", [dict(good, video=video)])
        with pytest.raises(DataError, match=re.escape(needle)):
            data.load_records(path)
    capfd.readouterr()
    with pytest.raises(DataError, match="is empty"):
        data.read_video(str(tmp_path / "videos" / "empty.mp4"), rid="e")
    with pytest.raises(DataError, match="is a directory"):
        data.read_video(str(tmp_path / "videos" / "clip.mp4"), rid="d")
    captured = capfd.readouterr()
    assert "ERROR" not in captured.out + captured.err  # decord never saw the empty file


def test_resumed_log_continues_from_the_snapshot_step(tmp_path):
    out = str(tmp_path)
    log = T.open_log(out, {"lr": 1})
    for phase, steps in (("alarm_init", 2), ("at_sft", 4)):
        for s in range(1, steps + 1):
            log({"phase": phase, "step": s, "of": steps})
    log = T.open_log(out, {"lr": 1}, resume={"phase": "at_sft", "step": 2})  # killed after step 4, snapshot at 2
    log({"phase": "at_sft", "step": 3, "of": 4})
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    steps = [(r["phase"], r["step"]) for r in rows if "step" in r]
    assert steps == [("alarm_init", 1), ("alarm_init", 2), ("at_sft", 1), ("at_sft", 2), ("at_sft", 3)]
    assert rows[0] == {"config": {"lr": 1}} and rows[5] == {"config": {"lr": 1}, "resumed_at_step": 2}
