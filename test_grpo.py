"""Tests for grpo.py and model.completion_logprobs.

    python -m pytest -q test_grpo.py                 # all (the learning test takes about two minutes on CPU)
    python -m pytest -q test_grpo.py -k "not learns"  # the fast ones

1. The log-probs the training forward computes equal those under which generate sampled the tokens
   (generate's raw logits), for all three tiny families, with left-padded prompts and an early EOS; so the
   first pass's ratio is exactly 1.
2. Advantage, k3 KL, clipped loss (both averagings) and its gradient equal hand-computed values.
3. The fast path (model.py: one video encoding and one prefill per group) gives exactly generate's greedy tokens,
   HF's top-p filter, and the straightforward path's log-probs, loss and gradients (bench.py's), per family.
4. The CLI runs, logs what the issue asks for, and writes a checkpoint load_model reads.
5. On the demo data, after a quick cold start, the mean reward rises during a short GRPO run.
"""

import json
import math
import os
import random

import pytest
import torch

import bench
import data as D
import grpo
import model as M
import rewards as R


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A private copy of the demo data (cold-start and GRPO splits), so no other test can change it under us."""
    out = str(tmp_path_factory.mktemp("demo"))
    return D.write_demo(out, sizes={"at_sft": 0, "eval": 0})


# -----------------------------------------------------------------------------
# 1. log-probs: sampling time == training forward


@pytest.mark.parametrize("name", M.TINY_MODELS)
def test_logprobs_match_generation(name, demo):
    torch.manual_seed(0)
    llm = M.load_model(name, device="cpu", dtype="fp32")
    records = D.load_records(os.path.join(demo, "grpo.jsonl"))
    records = sorted(records[:12], key=lambda r: len(r.query))[::4]  # different lengths: real left padding
    batch = D.collate(llm, records, structured=True, with_target=False)
    assert (batch["attention_mask"] == 0).any(), "the test needs a left-padded row"
    inputs = {k: batch[k] for k in batch["model_keys"]}
    llm.model.eval()
    out = llm.model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             use_cache=True, eos_token_id=llm.eot_id, pad_token_id=llm.tokenizer.pad_token_id,
                             output_logits=True, return_dict_in_generate=True)
    completion = out.sequences[:, batch["input_ids"].shape[1]:].clone()  # (B, L)
    # Row 0 "ends" at token 5: an EOS there, padding after. The logits at steps <= 5 depend only on earlier
    # tokens, so generate's logits still give the reference log-prob of every kept token, the EOS included.
    completion[0, 5], completion[0, 6:] = llm.eot_id, llm.tokenizer.pad_token_id
    mask = M.completion_mask(completion, llm.eot_id)
    assert mask[0].tolist() == [True] * 6 + [False] * 6 and mask[1:].all()
    sampled = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B, L, V): raw logits, no warpers
    expected = sampled.gather(2, completion[..., None]).squeeze(-1) * mask  # (B, L)

    llm.model.train()  # as in the update
    with torch.no_grad():
        old = M.completion_logprobs(llm, batch, completion, mask, chunk=5)  # as recorded in the rollout
        other_chunks = M.completion_logprobs(llm, batch, completion, mask, chunk=1024)
    new = M.completion_logprobs(llm, batch, completion, mask, chunk=5)  # the training forward, with grad
    assert new.requires_grad and old.shape == completion.shape
    torch.testing.assert_close(old, expected, atol=1e-4, rtol=0)  # fp32: generation and training agree
    torch.testing.assert_close(other_chunks, old, atol=1e-6, rtol=0)  # chunking changes only rounding
    assert torch.equal(torch.exp(new.detach() - old)[mask], torch.ones(int(mask.sum())))  # ρ = 1 exactly
    assert (old[~mask] == 0).all()
    new.sum().backward()  # gradients reach the LLM through the chunked, checkpointed LM head
    assert llm.model.lm_head.weight.grad is not None and llm.model.lm_head.weight.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# 1b. the fast path equals the straightforward one


def _one_prompt(name, demo, index=0):
    llm = M.load_model(name, device="cpu", dtype="fp32")
    record = D.load_records(os.path.join(demo, "grpo.jsonl"))[index]
    return llm, D.collate(llm, [record], structured=True, with_target=False)


@pytest.mark.parametrize("name", M.TINY_MODELS)
def test_shared_prefix_text_only_prompt_after_other_forwards(name, demo):
    """A text-only prompt right after a video prompt and a 3-row training forward: nothing from those (Qwen's
    cached rope_deltas) leaks into its positions; greedy tokens still equal generate's."""
    llm, video_prompt = _one_prompt(name, demo)
    M.sample_group(llm, M.encode_videos(llm, video_prompt), 2, max_new_tokens=4)
    completion = torch.full((3, 4), llm.eot_id)
    with torch.no_grad():
        M.completion_logprobs(llm, M.repeat_rows(video_prompt, 3), completion, M.completion_mask(completion, llm.eot_id))
    record = D.load_records(os.path.join(demo, "grpo.jsonl"))[3]
    text_prompt = D.collate(llm, [record], structured=True, with_target=False, no_video=True)
    fast, _ = M.sample_group(llm, M.encode_videos(llm, text_prompt), 2, max_new_tokens=16, do_sample=False)
    expected, _ = M.generate(llm, text_prompt, max_new_tokens=16)
    assert torch.equal(fast, expected.expand(2, -1))


@pytest.mark.parametrize("name", M.TINY_MODELS)
def test_shared_prefix_greedy_equals_generate(name, demo, monkeypatch):
    llm, prompt = _one_prompt(name, demo)
    expected, texts = M.generate(llm, prompt, max_new_tokens=16)  # (1, 16): HF generate, greedy
    assert expected.shape == (1, 16)
    fast, fast_texts = M.sample_group(llm, M.encode_videos(llm, prompt), 3, max_new_tokens=16, do_sample=False)
    assert torch.equal(fast, expected.expand(3, -1)) and fast_texts == texts * 3
    # stopping: make the 6th greedy token the end-of-turn token; both stop right after it, nothing more
    monkeypatch.setattr(M.VideoLLM, "eot_id", property(lambda self: int(expected[0, 5])))
    stop = int(expected[0, 5])
    cut, _ = M.generate(llm, prompt, max_new_tokens=16)
    fast, _ = M.sample_group(llm, M.encode_videos(llm, prompt), 2, max_new_tokens=16, do_sample=False)
    first = int((expected[0] == stop).nonzero()[0])
    assert cut.shape[1] == first + 1 and torch.equal(fast, cut.expand(2, -1))


def test_top_p_filter_is_hfs():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    for temperature, top_p in ((1.0, 0.95), (0.7, 0.5), (1.3, 0.1)):
        ours = M._warp(logits, temperature, top_p)
        theirs = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        assert torch.equal(ours, theirs)
        assert (ours.isfinite().sum(dim=1) >= 1).all()


def test_sampled_rows_end_independently(demo, monkeypatch):
    """Rows that end early get the pad token after their end-of-turn token; the others go on."""
    llm, prompt = _one_prompt("tiny-videollama3", demo)
    torch.manual_seed(0)
    free, _ = M.sample_group(llm, prompt, 8, max_new_tokens=12)
    stop = int(free[0, 2])  # a token row 0 draws; other rows draw it elsewhere or not at all
    monkeypatch.setattr(M.VideoLLM, "eot_id", property(lambda self: stop))
    torch.manual_seed(0)
    completion, texts = M.sample_group(llm, prompt, 8, max_new_tokens=12)
    mask = M.completion_mask(completion, stop)
    assert int(mask[0].sum()) == 3 and torch.equal(completion[0, :3], free[0, :3])  # same draws up to the stop
    assert (completion[~mask] == llm.tokenizer.pad_token_id).all()
    assert len(set(mask.sum(dim=1).tolist())) > 1  # the rows ended at different lengths


@pytest.mark.parametrize("name", M.TINY_MODELS)
def test_fast_logprobs_and_loss_equal_straightforward(name, demo):
    """The update's inputs built the fast way (video features computed once and shared by the G rows, LM head at
    completion positions only) give the straightforward path's per-token log-probs, loss and gradient."""
    llm, prompt = _one_prompt(name, demo, index=1)
    torch.manual_seed(0)
    G = 4
    completion, _ = M.sample_group(llm, prompt, G, max_new_tokens=10)
    completion[1, 4] = llm.eot_id  # an early end: masking is exercised
    mask = M.completion_mask(completion, llm.eot_id)
    slow_batch, fast_batch = M.repeat_rows(prompt, G), M.repeat_rows(M.encode_videos(llm, prompt), G)
    assert "pixel_values_videos" in slow_batch["model_keys"] and "pixel_values_videos" not in fast_batch["model_keys"]
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    grads, losses, logps = [], [], []
    for logprobs, batch in ((bench.straightforward_logprobs, slow_batch), (M.completion_logprobs, fast_batch)):
        llm.model.zero_grad(set_to_none=True)
        logp = logprobs(llm, batch, completion, mask)
        old = logp.detach() + 0.05 * torch.randn_like(logp, generator=torch.Generator().manual_seed(1))  # ρ ≠ 1
        loss, _ = grpo.grpo_loss(logp, old * mask, (old - 0.1) * mask, advantages, mask)
        loss.backward()
        logps.append(logp.detach()), losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in llm.llm_parameters() if p.grad is not None]))
    assert (logps[0][mask] < 0).all()
    torch.testing.assert_close(logps[1], logps[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


def test_bench_runs_and_reports(tmp_path):
    """bench.py end to end on a small shape: both paths run and the JSON carries the figures (no timing asserted)."""
    out = tmp_path / "bench.json"
    bench.main(["--frames", "2", "--frame-size", "56x56", "--vocab-size", "2048", "--group-size", "2",
                "--completion-tokens", "4", "--device", "cpu", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["vocab_size"] == 2048 and report["visual_tokens"] > 0
    for key in ("step_speedup", "memory_ratio", "rollout_speedup", "forward_backward_speedup"):
        assert math.isfinite(report[key]) and report[key] > 0
    for path in ("straightforward", "fast"):
        assert report[path]["completion_len"] > 0 and report[path]["s_step"] >= report[path]["s_rollout"]


# -----------------------------------------------------------------------------
# 2. the math, against hand-computed numbers


def test_group_advantages():
    A = grpo.group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    std = math.sqrt((1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3)  # unbiased: n − 1 = 3
    torch.testing.assert_close(A, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4))
    same = grpo.group_advantages(torch.tensor([0.7, 0.7, 0.7]))
    assert torch.equal(same, torch.zeros(3))  # no signal, exactly zero


def test_k3_kl():
    logp, ref = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 0.5]))
    # x = ref − logp = log(1/2): e^x − x − 1 = 0.5 + log 2 − 1; identical distributions: 0
    torch.testing.assert_close(grpo.k3_kl(logp, ref), torch.tensor([0.5 + math.log(2) - 1, 0.0]))


def _loss_inputs():
    ratio = torch.tensor([[1.0, 1.5, 0.5], [0.7, 1.1, 1.3]])
    logp = torch.log(torch.tensor([[0.3, 0.2, 0.1], [0.4, 0.5, 0.6]])).requires_grad_(True)
    old = logp.detach() - torch.log(ratio)  # so that exp(logp − old) = ratio
    ref = logp.detach() + math.log(2)  # π_ref = 2·π_θ everywhere: k3 = 2 − log 2 − 1
    A = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return logp, old, ref, A, mask


def test_grpo_loss_hand_computed():
    c = 0.04 * (2 - math.log(2) - 1)  # β·KL, the same at every token
    # surrogate min(ρA, clip(ρ, 0.8, 1.2)·A): row 0 (A = +1): 1, min(1.5, 1.2) = 1.2, [masked];
    # row 1 (A = −1): min(−0.7, −0.8) = −0.8, −1.1, min(−1.3, −1.2) = −1.3
    seq = ((-(1 + 1.2) / 2 + c) + ((0.8 + 1.1 + 1.3) / 3 + c)) / 2  # mean over tokens, then over completions
    tok = (-(1 + 1.2) + (0.8 + 1.1 + 1.3)) / 5 + c  # mean over all 5 tokens
    for avg, want in (("sequence", seq), ("token", tok)):
        logp, old, ref, A, mask = _loss_inputs()
        loss, stats = grpo.grpo_loss(logp, old, ref, A, mask, epsilon=0.2, beta=0.04, loss_avg=avg)
        assert abs(loss.item() - want) < 1e-6, (avg, loss.item(), want)
        assert int(stats["clipped"]) == 2  # row 0 token 1 (ρ > 1.2, A > 0), row 1 token 0 (ρ < 0.8, A < 0)
        torch.testing.assert_close(stats["kl"], torch.full((2,), c / 0.04))
    # gradient, sequence averaging: d/dlogp of −ρA + β·k3 is −ρA − β·(π_ref/π_θ − 1) = −ρA − 0.04 where the
    # surrogate is not clipped, and −0.04 where it is; each divided by |o_i| and by the 2 completions.
    logp, old, ref, A, mask = _loss_inputs()
    grpo.grpo_loss(logp, old, ref, A, mask, epsilon=0.2, beta=0.04)[0].backward()
    want = torch.tensor([[(-1.0 - 0.04) / 4, -0.04 / 4, 0.0],
                         [-0.04 / 6, (1.1 - 0.04) / 6, (1.3 - 0.04) / 6]])
    torch.testing.assert_close(logp.grad, want)


def test_grpo_loss_accumulates_to_the_batch_loss():
    """The update sums the loss over groups with the step's n_seqs / n_tokens: that must be the batch's loss."""
    torch.manual_seed(0)
    logp, old, ref = torch.randn(3, 6, 5).unbind(0)  # three (6, 5) tensors
    A, mask = torch.randn(6), torch.rand(6, 5) > 0.3
    mask[:, 0] = True
    for avg in ("sequence", "token"):
        whole = grpo.grpo_loss(logp, old, ref, A, mask, loss_avg=avg)[0]
        parts = sum(grpo.grpo_loss(logp[s], old[s], ref[s], A[s], mask[s], loss_avg=avg, n_seqs=6,
                                   n_tokens=int(mask.sum()))[0] for s in (slice(0, 2), slice(2, 6)))
        torch.testing.assert_close(parts, whole)


def test_group_size_must_be_at_least_two():
    with pytest.raises(SystemExit):
        grpo.parse_args(["--group-size", "1", "--data", "x.jsonl"])


# -----------------------------------------------------------------------------
# 3. the command line


def test_cli_runs_logs_and_saves(demo, tmp_path):
    out = str(tmp_path / "grpo")
    grpo.main(["--model", "tiny-qwen2.5-vl", "--data", os.path.join(demo, "grpo.jsonl"), "--out", out,
               "--group-size", "2", "--batch-size", "1", "--max-completion-length", "8", "--max-steps", "2",
               "--passes", "2", "--lr", "1e-3", "--device", "cpu"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in rows if "step" in r]
    assert "config" in rows[0] and len(steps) == 2 and "summary" in rows[-1]
    for key in ("reward", "format_rate", "rouge", "video_acc", "text_acc", "alpha", "kl", "clip_frac",
                "completion_len", "zero_var_groups", "s_rollout", "s_update", "loss", "grad_norm", "lr"):
        assert key in steps[0] and math.isfinite(steps[0][key]), key
    assert 0.1 <= steps[0]["alpha"] <= 0.5 and steps[0]["completion_len"] <= 8
    llm = M.load_model(out, device="cpu", dtype="fp32")  # what eval.py does
    assert llm.meta["stage"] == "grpo" and llm.alarm is not None


# -----------------------------------------------------------------------------
# 4. it learns


def _quick_cold_start(demo: str, out: str, lr: float = 3e-3, target_format_rate: float = 0.3) -> tuple[str, float]:
    """A few lines of supervised cold start, stopped once sampled completions (temperature 1, as in GRPO) have
    the structured format about `target_format_rate` of the time: GRPO then has room to improve and variance to
    learn from. Stopping on the measured rate, not after a fixed number of steps, keeps the test meaningful
    when the prompts or the demo data change."""
    M.seed_everything(0)
    llm = M.load_model("tiny-videollama3", device="cpu", dtype="fp32")
    M.set_trainable(llm, train_llm=True, train_alarm=False, train_heads=False)
    optimizer = torch.optim.AdamW([p for p in llm.llm_parameters() if p.requires_grad], lr=lr)
    records, rng = D.load_records(os.path.join(demo, "cold_start.jsonl")), random.Random(0)
    probe = D.collate(llm, D.load_records(os.path.join(demo, "grpo.jsonl"))[:8] * 4, structured=True, with_target=False)
    llm.model.train()
    for step in range(1, 301):
        llm.forward(D.collate(llm, rng.sample(records, 8), structured=True, with_target=True))["lm_loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 40 and step % 5 == 0:
            texts = M.generate(llm, probe, max_new_tokens=96, do_sample=True, temperature=1.0, top_p=0.95)[1]
            rate = sum(map(R.format_reward, texts)) / len(texts)
            if rate >= target_format_rate:
                break
    M.save_checkpoint(llm, out, meta={"stage": "cold_start", "step": step})
    return out, rate


def test_grpo_learns_on_demo(demo, tmp_path):
    start, rate = _quick_cold_start(demo, str(tmp_path / "cold_start"))
    assert rate >= 0.3, "the quick cold start did not learn the format in 300 steps"
    out = str(tmp_path / "grpo")
    grpo.main(["--model", start, "--data", os.path.join(demo, "grpo.jsonl"), "--out", out, "--seed", "0",
               "--group-size", "4", "--batch-size", "8", "--max-completion-length", "96", "--lr", "2e-4",
               "--passes", "2", "--epochs", "5", "--max-steps", "60", "--device", "cpu"])
    steps = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "step" in r]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    first, last = mean(steps[:10], "reward"), mean(steps[-10:], "reward")  # 320 completions each
    # Seen: +0.43 and +0.51 (seeds 0, 1); one step's mean over 32 completions has a spread of about 0.3.
    assert last > first + 0.25, f"mean reward, first 10 steps {first:.3f}, last 10 steps {last:.3f}"
    assert mean(steps[-10:], "format_rate") > mean(steps[:10], "format_rate")
