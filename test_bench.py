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
