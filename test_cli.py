"""Bad input on the command line: one clear line and a non-zero exit (--debug shows the traceback), or with
--skip-bad-records the bad records left out and named, in AT-SFT, GRPO and eval."""

import json
import os

import at_sft
import grpo
from conftest import GRPO, ONE_THREAD, SFT, run_script

def test_bad_input_one_line_and_nonzero_exit(bad_data, demo_dir, tmp_path):
    r = run_script("at_sft.py", "--data", bad_data, "--out", str(tmp_path / "o"), *SFT, "--max-steps", "1")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "bad input" in last and "bad.jsonl:4" in last and "malformed JSON" in last

    r = run_script("eval.py", "--data", bad_data, "--out", str(tmp_path / "e"), "--max-new-tokens", "4")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "bad.jsonl:4" in r.stderr

    r = run_script("at_sft.py", "--data", bad_data, "--out", str(tmp_path / "o"), *SFT, "--max-steps", "1", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr  # --debug shows it


def test_skip_bad_records_names_them(bad_data, tmp_path):
    out = str(tmp_path / "skip")
    summary = at_sft.main(["--data", bad_data, "--out", out, *SFT, "--epochs", "1", "--skip-bad-records"])
    assert summary["skipped_records"] == 3
    text = " ".join(summary["skipped"])
    assert "bad.jsonl:4" in text and "missing-video" in text and "broken-video" in text
    assert "nope.mp4" in text and "garbage.mp4" in text  # named with their paths; never replaced


def test_grpo_bad_input_one_line_and_skip(bad_data, tmp_path):
    r = run_script("grpo.py", "--data", bad_data, "--out", str(tmp_path / "o"), *GRPO, env=ONE_THREAD)
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
