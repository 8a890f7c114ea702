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
