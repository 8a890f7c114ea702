"""Cold start end to end on the tiny model: it trains the LLM only, on structured targets, with the alarm tokens
in the prompt and the alarm vectors and ATC heads frozen."""

import torch

import at_sft
import cold_start
from conftest import checkpoint_weights, metrics_rows

FAST = ["--batch-size", "3", "--grad-accum", "2", "--lr-llm", "3e-3", "--lr-alarm", "3e-2", "--lr-heads", "3e-2",
        "--warmup-ratio", "0", "--eval-records", "3"]


def test_cold_start_trains_llm_only_with_alarm_in_prompt(demo_dir, tmp_path):
    first = str(tmp_path / "at_sft")
    at_sft.main(["--data", f"{demo_dir}/at_sft.jsonl", "--eval-data", f"{demo_dir}/eval.jsonl", "--out", first, *FAST,
                 "--max-steps", "1", "--eval-records", "0"])
    out = str(tmp_path / "cold")
    summary = cold_start.main(["--model", first, "--data", f"{demo_dir}/cold_start.jsonl", "--eval-data",
                               f"{demo_dir}/eval.jsonl", "--out", out, *FAST, "--epochs", "6"])
    steps = [r for r in metrics_rows(out) if r.get("phase") == "cold_start"]
    assert len(steps) == 6 and "atc_v" not in steps[0] and set(k for k in steps[0] if k.startswith("lr_")) == {"lr_llm"}
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert 0.0 <= summary["heldout_format_rate"] <= 1.0
    before, after = checkpoint_weights(first), checkpoint_weights(out)
    for k in ("alarm.vectors", "alarm.head_v.weight", "alarm.head_t.bias"):  # frozen in cold start
        assert torch.equal(before[k], after[k])
