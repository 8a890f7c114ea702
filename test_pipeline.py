"""run_all.sh end to end with tiny budgets: every stage runs, hands its checkpoint to the next, and the
report and summary.json come out with one entry per stage, the guard table with a row per stage and head; a
failing stage stops the pipeline by name."""

import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = {  # later flags override run_all.sh's demo budgets (argparse: the last one wins)
    "AT_SFT_ARGS": "--epochs 1 --max-steps 2 --eval-records 3",
    "COLD_START_ARGS": "--epochs 1 --max-steps 2 --eval-records 3",
    "GRPO_ARGS": "--max-steps 1 --batch-size 2 --group-size 2 --max-completion-length 8",
    "EVAL_ARGS": "--limit 6 --max-new-tokens 8",
}


def _run_all(tmp_path, **env):
    return subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RUNS_DIR": str(tmp_path), "RUN_NAME": "tiny", **TINY, **env})


def test_run_all_end_to_end(demo_dir, tmp_path):
    r = _run_all(tmp_path, DATA_ROOT=demo_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "tiny"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["base", "at_sft", "cold_start", "grpo"]
    for stage, m in summary.items():
        assert m["n"] == 6 and {"dsr_hh", "dsr_sh", "frr_safeq", "format_rate", "video_label_acc",
                                "text_label_acc", "mean_reward"} <= set(m), stage
    assert summary["base"]["atc_v_acc"] is None and summary["at_sft"]["atc_v_acc"] is not None  # heads from AT-SFT on
    report = (out / "report.md").read_text()
    assert all(s in report for s in summary)
    for stage in ("at_sft", "cold_start", "grpo"):  # each stage's checkpoint fed the next
        meta = json.loads((out / stage / "videosafety_meta.json").read_text())
        assert meta["stage"] == stage
    assert json.loads((out / "cold_start" / "videosafety_meta.json").read_text())["args"]["model"] == str(out / "at_sft")
    guard_md = (out / "guard.md").read_text()  # every stage's heads as a guard, on the held-out guard split
    for stage in ("at_sft", "cold_start", "grpo"):
        g = json.loads((out / "guard" / f"{stage}.json").read_text())
        assert g["stage"] == stage and g["data"].endswith("guard.jsonl") and len(g["records"]) == 6
        assert f"| {stage} | 1 | video | 6 | {g['metrics']['video']['threshold']:.3f} |" in guard_md
    assert guard_md in r.stdout


def test_run_all_stops_at_the_failing_stage(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    r = _run_all(tmp_path, DATA_ROOT=str(empty))  # no at_sft.jsonl there
    assert r.returncode != 0
    assert "stage 'at_sft' FAILED" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "tiny" / "cold_start").exists()
