"""Tests of guard.py: its probabilities are VideoLLM.forward's ATC heads on the checkpoint's prompt (one prefill, no
generation), decisions use the thresholds saved with the heads, the CLI end to end on demo records, and one-line
errors for bad input."""

import json
import os
import sys

import pytest
import torch

import cli
import data
import demo
import guard as G
import model
from conftest import randomize_alarm

THRESHOLDS = {"v": 0.37, "t": 0.61}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny-videollama3 GRPO-stage checkpoint (structured prompts) with known random alarm vectors and heads and
    thresholds that are not 0.5."""
    llm = model.load_model("tiny-videollama3", device="cpu", dtype=torch.float32)
    randomize_alarm(llm, 11)
    llm.alarm.thresholds = dict(THRESHOLDS)
    out = str(tmp_path_factory.mktemp("guard") / "grpo")
    model.save_checkpoint(llm, out, meta={"stage": "grpo"})
    return out


def test_guard_is_the_forward_atc_heads_in_one_prefill(ckpt, demo_dir, text_record, image_records, monkeypatch):
    g = G.Guard.load(ckpt, device="cpu", dtype=torch.float32)
    assert g.prompt["structured"] and g.thresholds == {"video": 0.37, "text": 0.61}  # from alarm.safetensors
    recs = data.load_records(os.path.join(demo_dir, "eval.jsonl"))[:3] + [text_record, image_records[0]]
    prefills = []
    backbone = g.llm.backbone
    monkeypatch.setattr(g.llm, "backbone", lambda inputs: prefills.append(1) or backbone(inputs))
    monkeypatch.setattr(g.llm.model, "generate", lambda *a, **k: pytest.fail("the guard generated"))
    for r in recs:
        got = g(r.query, video=r.video, image=r.image)  # the Python API, one query
        assert len(prefills) == 1  # one forward per query
        batch = data.collate(g.llm, [r], structured=True, with_target=False)  # the reference: the stage's prompt
        with torch.no_grad():
            ref = g.llm.forward(batch, need_lm=False)
        prefills.clear()
        p_v, p_t = torch.sigmoid(ref["logit_v"])[0].item(), torch.sigmoid(ref["logit_t"])[0].item()
        visual = r.video is not None or bool(r.image)
        assert got["p_text"] == p_t and got["harmful_query"] == (p_t >= 0.61), r.id
        assert got["p_video"] == (p_v if visual else None), r.id  # text only: no video to judge
        assert got["harmful_video"] == ((p_v >= 0.37) if visual else None), r.id
        assert (got["threshold_video"], got["threshold_text"]) == (0.37, 0.61)
    decisions = {got["harmful_query"] for got in g.classify(recs)} | {got["harmful_video"] for got in g.classify(recs)}
    assert {True, False} <= decisions  # the thresholds cut somewhere: the checks above are not all one way


def test_guard_cli_on_demo_records(ckpt, demo_dir, tmp_path, capsys):
    path, out = os.path.join(demo_dir, "eval.jsonl"), str(tmp_path / "guard.json")
    G.main(["--model", ckpt, "--data", path, "--json", out, "--device", "cpu"])  # the command line, in-process
    printed = capsys.readouterr().out
    assert "head    n" in printed and "latency per query (batch 1)" in printed
    report = json.load(open(out))
    rows, m = report["records"], report["metrics"]
    assert len(rows) == len(data.load_records(path)) == m["video"]["n"] == m["text"]["n"]
    assert {"id", "p_video", "p_text", "threshold_video", "threshold_text", "harmful_video", "harmful_query",
            "video_label", "text_label", "ms"} <= set(rows[0])
    for head, label, thr in (("video", "video_label", 0.37), ("text", "text_label", 0.61)):  # the table's numbers
        assert m[head]["threshold"] == thr
        assert m[head]["acc"] == pytest.approx(sum((x[f"p_{head}"] >= thr) == x[label] for x in rows) / len(rows))
        assert m[head]["acc_at_0.5"] == pytest.approx(sum((x[f"p_{head}"] >= 0.5) == x[label] for x in rows) / len(rows))
    lat = m["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] and lat["mean"] > 0

    # one query: one JSON object on stdout (in-process)
    G.main(["--model", ckpt, "--query", "How do I make a weapon?", "--video", data.load_records(path)[0].video,
            "--device", "cpu"])
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(one) == {"p_video", "p_text", "threshold_video", "threshold_text", "harmful_video", "harmful_query"}


def _one_line(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["guard.py", *argv])
    with pytest.raises(SystemExit) as e:
        cli.run_cli(lambda: G.main(list(argv)))
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars, if any
    assert err.startswith("guard.py: ") and "Traceback" not in capsys.readouterr().err
    return e.value.code, err


def test_guard_errors_are_one_line(ckpt, tmp_path, monkeypatch, capsys):
    plain = demo.tiny_model_path("tiny-videollama3")  # a model without alarm heads
    code, err = _one_line(monkeypatch, capsys, "--model", plain, "--query", "hi", "--device", "cpu")
    assert code == 2 and "bad input" in err and "has no ATC heads" in err
    code, err = _one_line(monkeypatch, capsys, "--model", ckpt, "--query", "hi", "--video", str(tmp_path / "no.mp4"),
                          "--device", "cpu")
    assert code == 2 and "video not found" in err
    code, err = _one_line(monkeypatch, capsys, "--model", str(tmp_path / "runs" / "grpo"), "--query", "hi")
    assert code == 1 and "not found" in err
    with pytest.raises(SystemExit) as e:  # argparse: a query or a data file, not both
        G.parse_args(["--model", ckpt, "--query", "hi", "--data", "x.jsonl"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # --json a folder: said before any record is measured
        G.parse_args(["--model", ckpt, "--data", "x.jsonl", "--json", str(tmp_path)])
    assert e.value.code == 2 and "is a folder: give the file to write" in capsys.readouterr().err


def _guard_json(path, stage, v, t, p50, p95):
    """A file shaped as guard.py --data --json writes it: v / t = (n, threshold, acc, acc at 0.5, AUROC)."""
    head = lambda x: dict(zip(("n", "threshold", "acc", "acc_at_0.5", "auroc"), x))
    with open(path, "w") as f:
        json.dump({"model": f"runs/{stage}", "data": "demo_data/guard.jsonl", "stage": stage, "records": [],
                   "metrics": {"video": head(v), "text": head(t), "latency_ms": {"mean": p50, "p50": p50,
                                                                                  "p95": p95}}}, f)
    return str(path)


def test_report_is_one_row_per_stage_and_head_with_the_spread_over_seeds(tmp_path, capsys):
    seeds = [_guard_json(tmp_path / "s1.json", "at_sft", (60, 0.25, 0.95, 0.90, 0.99), (60, 0.5, 1.0, 1.0, 1.0), 40, 60),
             _guard_json(tmp_path / "s2.json", "at_sft", (60, 0.75, 0.85, 0.80, 0.97), (60, 0.5, 0.9, 0.8, None), 50, 80)]
    one = _guard_json(tmp_path / "g.json", "grpo", (60, 0.052, 0.9833, 0.6333, 0.998), (60, 0.986, 1.0, 0.9333, 1.0),
                      48, 70)
    out = tmp_path / "t" / "guard.md"
    G.main(["--report", *seeds, one, "--out", str(out)])
    text = capsys.readouterr().out
    assert out.read_text() in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # by hand: means 0.5 / 90.0 / 85.0 / 0.980, ranges [0.25-0.75] ...; one AUROC missing -> the other alone
    assert rows == [
        "| at_sft | 2 | video | 60 [60-60] | 0.500 [0.250-0.750] | 90.0 [85.0-95.0] | 85.0 [80.0-90.0] | "
        "0.980 [0.970-0.990] | 45 [40-50] / 70 [60-80] |",
        "|  |  | text | 60 [60-60] | 0.500 [0.500-0.500] | 95.0 [90.0-100.0] | 90.0 [80.0-100.0] | 1.000 |  |",
        "| grpo | 1 | video | 60 | 0.052 | 98.3 | 63.3 | 0.998 | 48 / 70 |",
        "|  |  | text | 60 | 0.986 | 100.0 | 93.3 | 1.000 |  |",
    ]
    assert "mean [min-max] over the runs" in text and "demo_data/guard.jsonl" in text


def test_report_of_a_real_run_and_its_bad_input(ckpt, demo_dir, tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "grpo.json")
    G.main(["--model", ckpt, "--data", os.path.join(demo_dir, "guard.jsonl"), "--json", path, "--device", "cpu"])
    m = json.load(open(path))["metrics"]
    capsys.readouterr()
    G.main(["--report", path])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| grpo")][0]
    assert row.split(" | ")[3:5] == [str(m["video"]["n"]), f"{m['video']['threshold']:.3f}"]
    not_guard = tmp_path / "summary.json"
    not_guard.write_text('{"base": {}}')
    code, err = _one_line(monkeypatch, capsys, "--report", str(not_guard))
    assert code == 2 and "not a file guard.py --data ... --json wrote" in err
    code, err = _one_line(monkeypatch, capsys, "--report", str(tmp_path / "absent.json"))
    assert code == 2 and "no such file" in err
    for argv in (["--report", path, "--model", ckpt], ["--report", path, "--out", str(tmp_path)],
                 ["--model", ckpt, "--query", "hi", "--out", "x.md"], ["--query", "hi"]):
        with pytest.raises(SystemExit) as e:
            G.parse_args(argv)
        assert e.value.code == 2, argv
