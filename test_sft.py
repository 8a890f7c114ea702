"""Tests of sft.py, the supervised loop AT-SFT and cold start share: its defaults are the paper's, the logged loss
is the equation's value on the very batches the step saw, gradient accumulation under the authors' step-sum
equals one big batch, and the held-out check fits the heads' thresholds."""

import os

import pytest
import torch

import data
import model as M
import recipe as RC
import training as T
from alarm import at_sft_loss
from sft import get_args, heldout_check, train_sft


def _args(demo_dir, tmp_path, *extra):
    return get_args(["--data", os.path.join(demo_dir, "at_sft.jsonl"), "--out", str(tmp_path / "out"),
                     "--device", "cpu", *extra])


def test_defaults_are_the_paper_s(demo_dir, tmp_path):
    a = _args(demo_dir, tmp_path)
    assert (a.lr_llm, a.lr_alarm, a.lr_heads) == (1e-6, 1e-5, 1e-5)
    assert (a.lambda_v, a.lambda_t, a.warmup_ratio, a.epochs, a.weight_decay) == (0.1, 0.1, 0.03, 1.0, 0.0)
    assert a.batch_size * a.grad_accum == 128 and (a.fps, a.max_frames) == (1.0, 90) and not a.two_phase
    assert get_args(["--data", a.data, "--recipe", "authors", "--out", a.out]).two_phase  # their stages 1 + 2
    cold = get_args(["--data", a.data, "--out", a.out], stage="cold_start")
    assert cold.lambda_v == 0.1 and cold.data == a.data  # the flag exists, hidden from cold start's --help


def _fresh(tiny="tiny-videollama3"):
    T.seed_everything(0)
    return M.load_model(tiny, device="cpu", dtype=torch.float32)


def test_logged_loss_is_the_at_sft_equation_on_the_step_s_batches(demo_dir, tmp_path):
    """One step of two micro-batches (batch 2, accumulation 2): the logged loss is the mean over the micro-batches of
    L_base + 0.1·BCE_v + 0.1·BCE_t, recomputed here on the records the run order gave, with the weights before the
    step."""
    args = _args(demo_dir, tmp_path, "--batch-size", "2", "--grad-accum", "2", "--max-steps", "1", "--seed", "3")
    records = data.load_records(args.data)
    llm = _fresh()
    prompt = RC.prompt_kwargs(args.recipe, "at_sft")
    order = data.run_order(len(records), 4, args.seed)
    want, parts_want = 0.0, {"lm": 0.0, "atc_v": 0.0, "atc_t": 0.0}
    with torch.no_grad():
        for micro in range(2):
            batch = data.collate(llm, [records[i] for i in order[2 * micro:2 * micro + 2]], with_target=True,
                                 **prompt)
            out = llm.forward(batch)
            loss, parts = at_sft_loss(out["lm_loss"], out["logit_v"], out["logit_t"], batch["video_label"],
                                      batch["text_label"], 0.1, 0.1)
            want += float(loss) / 2
            for k in parts_want:
                parts_want[k] += float(parts[k]) / 2
    rows = []
    before = {n: p.detach().clone() for n, p in llm.model.named_parameters()}
    steps = train_sft(llm, args, records, phase="at_sft", prompt=prompt, use_atc=True, train_alarm=True,
                      train_heads=True, log=rows.append, skipped={})
    assert steps == 1 and len(rows) == 1 and rows[0]["of"] == 1
    assert rows[0]["loss"] == pytest.approx(want, abs=1e-5)
    for k, v in parts_want.items():
        assert rows[0][k] == pytest.approx(v, abs=1e-5), k
    moved = [n for n, p in llm.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(M._is_llm(n) for n in moved)  # the LLM moved; the vision encoder and projector did not


def test_step_sum_accumulation_equals_one_big_batch(demo_dir, tmp_path):
    """Under --recipe authors the LM loss of a step is Σ CE / N_step (its label tokens) whatever the split into
    micro-batches: 4 records as 1 x 4, 2 x 2 or 4 x 1 give the same weights after a step of the LM-only phase
    (cold start, the authors' alarm init). The ATC terms stay per-micro-batch means, as in their Trainer, so the
    full AT-SFT step depends on the split (alarm.at_sft_loss)."""
    weights = []
    for bs, accum in ((4, 1), (2, 2), (1, 4)):
        args = _args(demo_dir, tmp_path, "--recipe", "authors", "--batch-size", str(bs), "--grad-accum", str(accum),
                     "--max-steps", "1", "--lr-llm", "1e-3", "--lr-alarm", "1e-2", "--lr-heads", "1e-2",
                     "--warmup-ratio", "0")
        records = data.load_records(args.data)
        llm = _fresh()
        train_sft(llm, args, records, phase="alarm_init", prompt=RC.prompt_kwargs(args.recipe, "at_sft"),
                  use_atc=False, train_alarm=True, train_heads=False, log=lambda row: None, skipped={})
        weights.append({n: p.detach().clone() for n, p in llm.model.named_parameters()}
                       | {f"alarm.{n}": p.detach().clone() for n, p in llm.alarm.named_parameters()})
    base = _fresh()
    start = dict(base.model.named_parameters())
    assert any(not torch.equal(weights[0][n], start[n]) for n in start)  # the step moved something
    for other in weights[1:]:
        for n, w in weights[0].items():
            torch.testing.assert_close(other[n], w, atol=2e-6, rtol=1e-4, msg=n)


def test_heldout_check_fits_thresholds_and_counts_formats(demo_dir, tmp_path):
    args = _args(demo_dir, tmp_path, "--batch-size", "3")
    llm = _fresh()
    heldout = data.load_records(os.path.join(demo_dir, "eval.jsonl"))
    got = heldout_check(llm, heldout, args, stage="at_sft", prompt=RC.prompt_kwargs(args.recipe, "at_sft"),
                        n_generate=4)
    assert got["heldout_n"] == len(heldout)
    assert got["heldout_format_rate"] in {i / 4 for i in range(5)}
    assert (llm.alarm.thresholds["v"], llm.alarm.thresholds["t"]) == (got["threshold_v"], got["threshold_t"])
    assert {"heldout_atc_v_acc", "heldout_atc_v_acc_fit", "heldout_atc_t_auroc"} <= set(got)
    assert got["heldout_atc_v_acc_fit"] >= got["heldout_atc_v_acc"] - 1e-9 or got["threshold_v"] == 0.5
