"""bench.py end to end on a small shape (no timing is asserted: speed targets live in bench.py's output)."""

import json
import math

import bench


def test_bench_runs_and_reports(tmp_path):
    """bench.py end to end on a small shape: both paths run, for 1 and 2 prompts per step, and the
    JSON carries the figures, per prompt count too (no timing asserted)."""
    out = tmp_path / "bench.json"
    bench.main(["--frames", "2", "--frame-size", "56x56", "--vocab-size", "2048", "--group-size", "2",
                "--completion-tokens", "4", "--device", "cpu", "--prompts", "1", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["vocab_size"] == 2048 and report["visual_tokens"] > 0
    for key in ("step_speedup", "memory_ratio", "rollout_speedup", "forward_backward_speedup"):
        assert math.isfinite(report[key]) and report[key] > 0
    for path in ("straightforward", "fast"):
        assert report[path]["completion_len"] > 0 and report[path]["s_step"] >= report[path]["s_rollout"]
    per_count = report["rollout_speedup_per_prompts"]
    assert report["prompts"] == [1, 2] and set(report["by_prompts"]) == set(per_count) == {"1", "2"}
    assert report["rollout_speedup"] == per_count["1"] == report["by_prompts"]["1"]["rollout_speedup"]  # the first's
    assert all(math.isfinite(v) and v > 0 for v in per_count.values())


def test_real_size_smoke(tmp_path):
    """--mode real-size at width / 16 and 1-2 LLM layers: every run reports its fit and GPU estimate, and LoRA's
    trained parameters and AdamW state bytes are below full fine-tuning's and equal the config arithmetic exactly."""
    out = tmp_path / "real.json"
    bench.main(["--mode", "real-size", "--scale", "16", "--layers", "1", "2", "--text-tokens", "32", "--vision-layers", "1",
                "--json", str(out)])
    real = json.loads(out.read_text())["real_size"]
    assert set(real["runs"]) == {"sft_full", "sft_lora", "grpo_full", "grpo_lora"} and real["real_layers"] == 28
    for run in real["runs"].values():
        assert {"fit_a_bytes", "fit_b_bytes_per_layer", "peak_bytes_extrapolated", "gpu_estimate"} <= set(run)
        for row in run["measured"]:  # what the optimizer holds is exactly the config numbers x bytes
            assert row["trainable_params"] == row["arithmetic"]["trainable_params"]
            assert row["adam_state_bytes"] == row["arithmetic"]["adam_state_bytes"]
            assert row["peak_bytes"] > 0
    for stage in ("sft", "grpo"):
        for full, lo in zip(real["runs"][f"{stage}_full"]["measured"], real["runs"][f"{stage}_lora"]["measured"]):
            assert lo["trainable_params"] < full["trainable_params"]
            assert lo["adam_state_bytes"] < full["adam_state_bytes"]
    llm = bench.real_arithmetic(2, 16)["llm"]  # the LLM's parameters from the config match the built model's
    assert real["runs"]["grpo_full"]["measured"][1]["llm_params"] == llm


def test_bad_shapes_are_argparse_errors(capsys):
    """A frame size that is not WIDTHxHEIGHT, or two equal --layers (the fit divides by their difference), stop when
    the arguments are parsed, not after the measuring."""
    import pytest

    for argv in (["--frame-size", "252"], ["--frame-size", "0x224"], ["--frame-size", "ax2"], ["--layers", "3", "3"]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(argv)
        assert e.value.code == 2, argv
        assert "--frame-size" in capsys.readouterr().err or argv[0] == "--layers"
    assert bench.parse_args(["--frame-size", "64X32"]).frame_size == "64x32"
