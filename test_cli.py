"""Bad input on the command line: one clear line and a non-zero exit (--debug shows the traceback), or with
--skip-bad-records the bad records left out and named, in AT-SFT, GRPO and eval."""

import argparse
import json
import os
import socket

import pytest

import at_sft
import grpo
import sft
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


def test_a_file_not_in_utf8_is_one_line(demo_dir, tmp_path):
    latin = tmp_path / "latin.jsonl"  # as a spreadsheet in Latin-1 writes it
    first = open(os.path.join(demo_dir, "eval.jsonl"), encoding="utf-8").readline().replace('"query": "', '"query": "caf\u00e9 ')
    latin.write_bytes(first.encode("latin-1"))
    for script, extra in (("eval.py", []), ("at_sft.py", ["--max-steps", "1"])):
        r = run_script(script, "--data", str(latin), "--out", str(tmp_path / script), *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"{latin}: not UTF-8" in r.stderr.strip().splitlines()[-1]  # the file named


def test_skip_bad_records_names_them(bad_data, tmp_path):
    out = str(tmp_path / "skip")
    summary = at_sft.main(["--data", bad_data, "--out", out, *SFT, "--epochs", "1", "--skip-bad-records"])
    assert summary["skipped_records"] == 3
    text = " ".join(summary["skipped"])
    assert "bad.jsonl:4" in text and "missing-video" in text and "broken-video" in text
    assert "nope.mp4" in text and "garbage.mp4" in text  # named with their paths; never replaced


def test_grpo_bad_input_one_line_and_skip(bad_grpo_data, tmp_path):
    bad_data = bad_grpo_data
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


# -----------------------------------------------------------------------------
# every numeric flag is checked when the arguments are parsed


def parsers():
    """{entry point: its ArgumentParser}, caught as each parses (argv ["--help"] never gets that far)."""
    import bench
    import build_data
    import cold_start
    import eval as ev
    import guard

    found = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        found["p"] = self
        raise SystemExit(0)

    entry = {"at_sft": lambda a: sft.get_args(a, doc=at_sft.__doc__),
             "cold_start": lambda a: sft.get_args(a, stage="cold_start", doc=cold_start.__doc__),
             "grpo": grpo.parse_args, "eval": ev.parse_args, "bench": bench.parse_args,
             "build_data": build_data.parse_args, "guard": guard.parse_args}
    out = {}
    argparse.ArgumentParser.parse_args = grab
    try:
        for name, fn in entry.items():
            try:
                fn([])
            except SystemExit:
                out[name] = found.pop("p")
    finally:
        argparse.ArgumentParser.parse_args = real
    return out


def numeric_actions():
    return [(name, a) for name, p in parsers().items() for a in p._actions
            if a.option_strings and a.type is not None and a.type is not str]


def test_no_numeric_flag_is_unchecked():
    """Every number goes through one of cli's checked types (--seed too: numpy takes 0 to 2**32 - 1)."""
    plain = [(n, a.option_strings[0]) for n, a in numeric_actions() if a.type in (int, float)]
    assert not plain, plain
    assert len(numeric_actions()) > 40  # the walk found the flags


BAD = {"an integer >= 1": ["0", "-1", "1.5"], "an integer >= 0": ["-1", "x"], "a number > 0": ["0", "-2", "nan"],
       "a number >= 0": ["-0.1", "inf"], "an integer in [0, 2**32 - 1]": ["-1", "4294967296"], "a number in [0, 1]": ["-0.1", "1.5"], "a number in (0, 1]": ["0", "1.01"],
       "a number in [0, 1)": ["1", "-0.1"]}


def test_every_bad_number_is_an_argparse_error(capsys):
    seen = 0
    for name, action in numeric_actions():
        what = getattr(action.type, "__name__", "")
        for value in BAD.get(what, []):
            p = parsers()[name]
            with pytest.raises(SystemExit) as e:
                n = action.nargs if isinstance(action.nargs, int) else 1  # --layers A B: both bad
                p.parse_args([action.option_strings[0], *[value] * n])
            assert e.value.code == 2
            err = capsys.readouterr().err
            assert action.option_strings[0] in err and what in err, err
            seen += 1
    assert seen > 80
    # a dropout of 1 would zero every adapter input: the adapters would never learn
    assert {a.type.__name__ for _, a in numeric_actions() if a.option_strings[0] == "--lora-dropout"} == {
        "a number in [0, 1)"}


def test_group_size_and_alpha_order():
    for argv in (["--group-size", "1"], ["--alpha-min", "0.6", "--alpha-max", "0.5"]):
        with pytest.raises(SystemExit) as e:
            grpo.parse_args(argv + ["--data", "x.jsonl"])
        assert e.value.code == 2


def test_judge_that_cannot_be_reached_is_one_line(demo_dir, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_script("eval.py", "--data", f"{demo_dir}/eval.jsonl", "--out", str(tmp_path / "e"), "--max-new-tokens", "2",
                   "--judge", "openai", "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-retries", "1",
                   "--judge-backoff", "0", "--device", "cpu", env=ONE_THREAD)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("eval.py: service: judge") and "cannot connect" in last and "is the server up" in last
