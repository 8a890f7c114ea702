"""plots.py: a stage's curves from a synthetic metrics.jsonl (one panel per key the log holds), the hint and no file
without matplotlib, and eval.py --compare's bar chart with report.md's links."""

import json
import math
import sys

import plots

PNG = b"\x89PNG\r\n\x1a\n"


def write_log(path, rows, config=None):
    """training.open_log's layout: a config row, the step rows, a summary row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"config": config or {"lr": 1e-3}}] + rows + [{"summary": {"stage": "x", "step": len(rows)}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def sft_rows(n=30):
    """at_sft.py's keys: two phases, loss and its parts, the heads' accuracy, one lr per parameter group."""
    return [{"phase": "alarm" if i < 10 else "full", "step": i % 10 + 1 if i < 10 else i - 9, "of": 10 if i < 10 else 20,
             "loss": 2 / (i + 1), "lm": 1.5 / (i + 1), "atc_v": 0.3 / (i + 1), "atc_t": 0.2 / (i + 1),
             "grad_norm": 1.0, "tok_per_s": 100.0, "lr_alarm": 1e-3, "lr_lm": 1e-5 * (1 - i / n),
             "atc_v_acc": min(1, i / n), "atc_t_acc": 0.5} for i in range(n)]


def grpo_rows(n=40):
    """grpo.py's keys (rollout_metrics + update's stats + lr + timings + the sample text)."""
    return [{"step": i + 1, "of": n, "reward": 1 + 2 * i / n, "reward_std": 0.5 * (1 - i / n),
             "zero_var_groups": 0.24 + 0.53 * i / n, "format_rate": 1.0, "rouge": 0.4 + math.sin(i) / 10,
             "video_acc": 0.6 + 0.01 * i, "text_acc": 0.7, "alpha": 0.5, "completion_len": 60 - i / 2,
             "loss": 0.01, "kl": 0.001 * i, "clip_frac": 0.02, "grad_norm": 0.3, "lr": 1e-6, "s_rollout": 1.0,
             "s_update": 0.5, "sample": "<think>...</think>"} for i in range(n)]


def is_png(path, min_bytes=5000):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > min_bytes


def test_sft_and_grpo_curves(tmp_path):
    sft = tmp_path / "at_sft"
    write_log(sft / "metrics.jsonl", sft_rows())
    assert plots.plot_run(str(sft)) == ["loss", "lm", "atc_v", "atc_t", "atc_v_acc", "atc_t_acc",
                                        "lr_alarm", "lr_lm"]
    assert is_png(sft / "curves.png")

    grpo = tmp_path / "grpo"
    write_log(grpo / "metrics.jsonl", grpo_rows())
    assert plots.plot_run(str(grpo)) == ["loss", "reward", "reward_std", "format_rate", "rouge", "video_acc", "text_acc",
                                         "alpha", "kl", "clip_frac", "completion_len", "zero_var_groups", "lr"]
    assert is_png(grpo / "curves.png")

    # the panels are the keys the log holds (plot_run draws panel_keys): cold start has no ATC loss, an older
    # grpo.py had no zero_var_groups
    cold = [{k: v for k, v in r.items() if not k.startswith("atc")} for r in sft_rows()]
    assert plots.panel_keys(cold) == ["loss", "lm", "lr_alarm", "lr_lm"]
    assert "zero_var_groups" not in plots.panel_keys([{k: v for k, v in r.items() if k != "zero_var_groups"}
                                                      for r in grpo_rows()])

    empty = tmp_path / "empty"  # killed before its first step: nothing drawn, no error
    write_log(empty / "metrics.jsonl", [])
    assert plots.plot_run(str(empty)) == [] and not (empty / "curves.png").exists()


def test_moving_average():
    assert plots.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plots.moving_average([2.0, 4.0], 1) == [2.0, 4.0]


def test_without_matplotlib_hint_once_and_nothing_written(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(plots, "_warned", False)
    write_log(tmp_path / "metrics.jsonl", grpo_rows(5))
    assert plots.plot_run(str(tmp_path)) == []
    assert plots.compare_chart([("a", {"dsr_hh": 0.5})], str(tmp_path / "compare.png")) == []
    assert capsys.readouterr().out == plots.HINT + "\n"  # printed once for both calls
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "compare.png").exists()


def test_compare_chart_and_report_links(tmp_path):
    """run_all.sh's layout: $OUT/eval/<stage>/metrics.json; $OUT/grpo/curves.png from training (at_sft has none)."""
    import eval as ev  # torch and the rest: imported only by this test
    out = tmp_path / "run"
    metrics = {"at_sft": {"n": 4, "dsr_hh": 0.5, "dsr_sh": 0.25, "frr_safeq": 0.0, "atc_v_acc": 0.75},
               "grpo": {"n": 4, "dsr_hh": 1.0, "dsr_sh": 0.75, "frr_safeq": 0.25, "format_rate": 1.0,
                        "video_label_acc": 0.75, "text_label_acc": 0.5, "mean_reward": 2.4}}
    for stage, m in metrics.items():
        (out / "eval" / stage).mkdir(parents=True)
        (out / "eval" / stage / "metrics.json").write_text(json.dumps(m))
    write_log(out / "grpo" / "metrics.jsonl", grpo_rows(10))
    assert plots.plot_run(str(out / "grpo"))
    ev.main(["--compare", str(out / "eval" / "at_sft"), str(out / "eval" / "grpo"), "--out", str(out)])
    assert is_png(out / "compare.png")
    report = (out / "report.md").read_text()
    assert "![headline metrics per run](compare.png)" in report
    assert "![grpo training curves](grpo/curves.png)" in report and "at_sft/curves.png" not in report
    keys = plots.compare_chart([(s, m) for s, m in metrics.items()], str(tmp_path / "c.png"))
    assert keys == ["dsr_hh", "dsr_sh", "frr_safeq", "format_rate", "video_label_acc", "text_label_acc",
                    "atc_v_acc", "mean_reward"]
