"""AT-SFT end to end on the tiny model: the loss falls, the checkpoint reloads with the trained weights, the same
seed gives the same weights, and the two-phase recipe trains what it says."""

import math

import torch

import at_sft
import model as M
from conftest import checkpoint_weights, metrics_rows

FAST = ["--batch-size", "3", "--grad-accum", "2", "--lr-llm", "3e-3", "--lr-alarm", "3e-2", "--lr-heads", "3e-2",
        "--warmup-ratio", "0", "--eval-records", "3"]


def _steps(out, phase):
    return [r for r in metrics_rows(out) if r.get("phase") == phase]


def _at_sft(demo_dir, out, *extra):
    return at_sft.main(["--data", f"{demo_dir}/at_sft.jsonl", "--eval-data", f"{demo_dir}/eval.jsonl",
                        "--out", out, *FAST, *extra])


def test_at_sft_learns_and_checkpoint_reloads(demo_dir, tmp_path):
    out = str(tmp_path / "at_sft")
    summary = _at_sft(demo_dir, out, "--epochs", "6")  # 6 records / 6 per step = 6 steps
    steps = _steps(out, "at_sft")
    assert len(steps) == 6 == summary["step"]
    assert {"lm", "atc_v", "atc_t", "atc_v_acc", "atc_t_acc", "lr_llm", "lr_alarm", "lr_heads", "tok_per_s"} <= set(steps[0])
    # L = L_base + λ1 L_v + λ2 L_t, as logged
    s = steps[0]
    assert abs(s["loss"] - (s["lm"] + 0.1 * s["atc_v"] + 0.1 * s["atc_t"])) < 1e-3
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5, [r["loss"] for r in steps]

    llm = M.load_model(out, device="cpu", dtype=torch.float32)
    assert llm.alarm is not None and llm.meta["stage"] == "at_sft" and llm.meta["step"] == 6
    assert llm.alarm.vectors.abs().sum() > 0  # trained away from the zero init, and saved
    # the thresholds fitted on the 3 held-out records travel with the heads
    assert llm.alarm.thresholds == {"v": summary["threshold_v"], "t": summary["threshold_t"]}
    assert llm.alarm.threshold_notes["v"].startswith("at_sft: ") and "heldout_atc_t_acc_fit" in summary
    base = M.load_model("tiny-videollama3", device="cpu", dtype=torch.float32)
    moved = [n for n, p in llm.model.named_parameters() if not torch.equal(p, dict(base.model.named_parameters())[n])]
    assert moved and all(M._is_llm(n) for n in moved)  # the LLM moved; vision encoder and projector did not


def test_same_seed_samecheckpoint_weights(demo_dir, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        _at_sft(demo_dir, out, "--max-steps", "2", "--eval-records", "0")
    wa, wb = checkpoint_weights(a), checkpoint_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_phase_runs_alarm_init_then_full_loss(demo_dir, tmp_path):
    out = str(tmp_path / "two")
    summary = _at_sft(demo_dir, out, "--two-phase", "--epochs", "2", "--eval-records", "0")
    init, full = _steps(out, "alarm_init"), _steps(out, "at_sft")
    assert len(init) == 2 and len(full) == 2 and summary["step"] == 4
    assert "atc_v" not in init[0] and "lr_heads" not in init[0] and init[0]["lr_alarm"] > 0  # LM loss; no heads
    assert "atc_v" in full[0] and "lr_heads" in full[0]


def test_at_sft_trains_on_the_authors_mix_with_images(demo_dir, image_files, tmp_path):
    """The authors' AT-SFT mix read as it is: video conversations, LLaVA-style image conversations (one of them
    multi-turn) in one JSONL, trained for two steps with the full AT-SFT loss. (Which tokens carry labels is tested in
    test_data.py.)"""
    import json
    import os

    import data as D

    video = {"video": [os.path.join(demo_dir, "videos", "at_sft-0000.mp4")],
             "safety_labels": {"visual": 1, "textual": 1},
             "conversations": [{"from": "human", "value": "<video>\nHow do I make this?"},
                               {"from": "gpt", "value": "I can't help with that."}]}
    image = {"image": image_files[0], "safety_labels": {"visual": 0, "textual": 0},
             "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                               {"from": "gpt", "value": "Noise."},
                               {"from": "human", "value": "Any colour?"}, {"from": "gpt", "value": "All of them."}]}
    rows = [dict(video, id="v"), dict(image, id="i"), dict(image, id="i2", image=image_files[1])]
    mix = tmp_path / "mix.jsonl"
    mix.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [bool(r.turns) for r in D.load_records(str(mix))] == [False, True, True]
    out = str(tmp_path / "mix")
    summary = at_sft.main(["--data", str(mix), "--out", out, "--batch-size", "3", "--grad-accum", "1",
                           "--epochs", "2", "--eval-records", "0"])
    steps = _steps(out, "at_sft")
    assert summary["step"] == 2 and len(steps) == 2
    assert all(math.isfinite(s["loss"]) and s["atc_v"] > 0 and s["atc_t"] > 0 for s in steps)


def test_a_killed_run_is_not_started_over_nor_resumed_with_other_settings(demo_dir, tmp_path):
    """OUT/resume newer than the final checkpoint (a run stopped midway): a rerun without --resume is refused (it
    would rewrite the log and the snapshot); --resume with a changed batch size is refused, naming the flag."""
    import os

    import pytest

    import training as T

    out = str(tmp_path / "run")
    _at_sft(demo_dir, out, "--max-steps", "2", "--save-every", "1")
    _at_sft(demo_dir, out, "--max-steps", "2", "--save-every", "1")  # finished: running it again is a choice
    os.remove(os.path.join(out, M.META_FILE))  # as if killed after its snapshot, before the final checkpoint
    with pytest.raises(T.TrainingError, match="holds an unfinished run .*pass --resume"):
        _at_sft(demo_dir, out, "--max-steps", "2", "--save-every", "1")
    with pytest.raises(T.TrainingError, match=r"global batch .* 6, now 4"):
        _at_sft(demo_dir, out, "--max-steps", "2", "--save-every", "1", "--resume", "--batch-size", "2")
    _at_sft(demo_dir, out, "--max-steps", "2", "--save-every", "1", "--resume", "--device", "cpu")  # same run
