"""Tests of rollout.py (GRPO's fast path: one video encoding and one prefill per group) on the three tiny
families: greedy tokens exactly generate's, also for a text-only prompt after other forwards; transformers'
top-p filter; rows that end independently; several prompts in one decode loop equal to one at a time; and the
update's log-probs, loss and gradients equal to the straightforward path's (bench.py's)."""

import os

import pytest
import torch

import bench
import data as D
import demo
import grpo
import model as M
import rollout


def _one_prompt(name, demo_dir, index=0):
    llm = M.load_model(name, device="cpu", dtype="fp32")
    record = D.load_records(os.path.join(demo_dir, "grpo.jsonl"))[index]
    return llm, D.collate(llm, [record], structured=True, with_target=False)


# -----------------------------------------------------------------------------
# greedy decoding from the shared prefix equals generate


@pytest.mark.parametrize("name", demo.TINY_MODELS)
def test_shared_prefix_text_only_prompt_after_other_forwards(name, demo_full):
    """A text-only prompt right after a video prompt and a 3-row training forward: nothing from those (Qwen's
    cached rope_deltas) leaks into its positions; greedy tokens still equal generate's."""
    llm, video_prompt = _one_prompt(name, demo_full)
    rollout.sample_group(llm, rollout.encode_videos(llm, video_prompt), 2, max_new_tokens=4)
    completion = torch.full((3, 4), llm.eot_id)
    with torch.no_grad():
        M.completion_logprobs(llm, rollout.repeat_rows(video_prompt, 3), completion, M.completion_mask(completion, llm.eot_id))
    record = D.load_records(os.path.join(demo_full, "grpo.jsonl"))[3]
    text_prompt = D.collate(llm, [record], structured=True, with_target=False, no_video=True)
    fast, _ = rollout.sample_group(llm, rollout.encode_videos(llm, text_prompt), 2, max_new_tokens=16, do_sample=False)
    expected, _ = M.generate(llm, text_prompt, max_new_tokens=16)
    assert torch.equal(fast, expected.expand(2, -1))


@pytest.mark.parametrize("name", demo.TINY_MODELS)
def test_shared_prefix_greedy_equals_generate(name, demo_full, monkeypatch):
    llm, prompt = _one_prompt(name, demo_full)
    expected, texts = M.generate(llm, prompt, max_new_tokens=16)  # (1, 16): HF generate, greedy
    assert expected.shape == (1, 16)
    fast, fast_texts = rollout.sample_group(llm, rollout.encode_videos(llm, prompt), 3, max_new_tokens=16, do_sample=False)
    assert torch.equal(fast, expected.expand(3, -1)) and fast_texts == texts * 3
    # stopping: make the 6th greedy token the end-of-turn token; both stop right after it, nothing more
    monkeypatch.setattr(M.VideoLLM, "eot_id", property(lambda self: int(expected[0, 5])))
    stop = int(expected[0, 5])
    cut, _ = M.generate(llm, prompt, max_new_tokens=16)
    fast, _ = rollout.sample_group(llm, rollout.encode_videos(llm, prompt), 2, max_new_tokens=16, do_sample=False)
    first = int((expected[0] == stop).nonzero()[0])
    assert cut.shape[1] == first + 1 and torch.equal(fast, cut.expand(2, -1))


# -----------------------------------------------------------------------------
# sampling


def test_top_p_filter_is_hfs():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    for temperature, top_p in ((1.0, 0.95), (0.7, 0.5), (1.3, 0.1)):
        ours = rollout.warp(logits, temperature, top_p)
        theirs = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        assert torch.equal(ours, theirs)
        assert (ours.isfinite().sum(dim=1) >= 1).all()


@pytest.mark.parametrize("top_k", (0, 50, 7))
def test_filter_is_hfs_with_and_without_top_k_ties_included(top_k, monkeypatch):
    """torch.equal against TopKLogitsWarper + TopPLogitsWarper: random logits (no full sort needed with top-k),
    peaked ones (the nucleus found among candidates without top-k) and quantised ones (ties at the k-th and at the cut)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(6, 3000, generator=g) * 3, torch.randn(6, 3000, generator=g) * 12,
             torch.randint(-4, 4, (6, 3000), generator=g).float()]
    for logits in cases:
        for temperature, top_p in ((1.0, 0.95), (0.7, 0.5), (1.3, 0.1), (1.0, 1.0)):
            theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
            if top_k:
                theirs = TopKLogitsWarper(top_k)(None, theirs)
            if top_p < 1:
                theirs = TopPLogitsWarper(top_p)(None, theirs)
            assert torch.equal(rollout.warp(logits, temperature, top_p, top_k), theirs)
    if top_k:  # random logits with top-k: no sort of the vocabulary at all
        monkeypatch.setattr(rollout, "_top_p_sorted", lambda *a: pytest.fail("full sort"))
        ids, vals = rollout.filtered(cases[0], 1.0, 0.95, top_k)
        assert ids.shape[1] == top_k and torch.multinomial(vals.softmax(-1), 1).shape == (6, 1)


def test_sampled_rows_end_independently(demo_full, monkeypatch):
    """Rows that end early get the pad token after their end-of-turn token; the others go on."""
    llm, prompt = _one_prompt("tiny-videollama3", demo_full)
    torch.manual_seed(0)
    free, _ = rollout.sample_group(llm, prompt, 8, max_new_tokens=12)
    stop = int(free[0, 2])  # a token row 0 draws; other rows draw it elsewhere or not at all
    monkeypatch.setattr(M.VideoLLM, "eot_id", property(lambda self: stop))
    torch.manual_seed(0)
    completion, texts = rollout.sample_group(llm, prompt, 8, max_new_tokens=12)
    mask = M.completion_mask(completion, stop)
    assert int(mask[0].sum()) == 3 and torch.equal(completion[0, :3], free[0, :3])  # same draws up to the stop
    assert (completion[~mask] == llm.tokenizer.pad_token_id).all()
    assert len(set(mask.sum(dim=1).tolist())) > 1  # the rows ended at different lengths


# -----------------------------------------------------------------------------
# several prompts in one decode loop equal one prompt at a time


def _one_at_a_time(llm, prompts, G, seeds, **sampling):
    """sample_group on each prompt alone, the global generator seeded per prompt (as grpo.py seeded it)."""
    out = []
    for prompt, seed in zip(prompts, seeds):
        torch.manual_seed(seed)
        out.append(rollout.sample_group(llm, prompt, G, **sampling))
    return out


@pytest.mark.parametrize("name", demo.TINY_MODELS)
def test_sample_groups_equal_one_prompt_at_a_time(name, demo_full, monkeypatch):
    """Three prompts of different lengths (video, text-only, video) in one decode loop, each with its own generator:
    per prompt the same tokens, texts and log-probs as sample_group on it alone after torch.manual_seed(its seed);
    sampling with top-p, with top-k, greedy; rows that end early, and a prompt whose rows all end first (dropped
    from the batch while the others go on)."""
    llm = M.load_model(name, device="cpu", dtype="fp32")
    records = D.load_records(os.path.join(demo_full, "grpo.jsonl"))
    prompts = [D.collate(llm, [records[0]], structured=True, with_target=False),
               D.collate(llm, [records[3]], structured=True, with_target=False, no_video=True),
               D.collate(llm, [records[1]], structured=True, with_target=False)]
    prompts = [rollout.encode_videos(llm, p) for p in prompts]
    assert len({p["input_ids"].shape[1] for p in prompts}) == 3 and "mm_encoder_outputs" not in prompts[1]
    G, seeds = 3, [11, 12, 13]

    def check(**sampling):
        one = _one_at_a_time(llm, prompts, G, seeds, max_new_tokens=10, **sampling)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        many = rollout.sample_groups(llm, prompts, G, max_new_tokens=10, generators=gens, **sampling)
        for prompt, (a, texts_a), (b, texts_b) in zip(prompts, one, many):
            assert torch.equal(a, b) and texts_a == texts_b
            mask = M.completion_mask(b, llm.eot_id)
            batch = rollout.repeat_rows(prompt, G)
            assert torch.equal(M.completion_logprobs(llm, batch, a, mask), M.completion_logprobs(llm, batch, b, mask))
        return [c for c, _ in many]

    free = check(top_p=0.95)
    check(top_p=0.95, top_k=50)
    greedy = check(do_sample=False)
    assert len({int(c[0, 0]) for c in free}) > 1  # the prompts really differ
    monkeypatch.setattr(M.VideoLLM, "eot_id", property(lambda self: int(free[0][0, 2])))
    ended = check(top_p=0.95)  # row 0 of prompt 0 ends at its 3rd token; others go on
    assert M.completion_mask(ended[0], llm.eot_id)[0].sum() == 3 and ended[0].shape[1] > 3
    monkeypatch.setattr(M.VideoLLM, "eot_id", property(lambda self: int(greedy[1][0, 3])))
    ended = check(do_sample=False)  # prompt 1's rows all end at their 4th token (or before): it leaves the batch
    assert ended[1].shape[1] <= 4 and max(c.shape[1] for c in ended) == 10


# -----------------------------------------------------------------------------
# the update's inputs built the fast way


@pytest.mark.parametrize("name", demo.TINY_MODELS)
def test_fast_logprobs_and_loss_equal_straightforward(name, demo_full):
    """The update's inputs built the fast way (video features computed once and shared by the G rows, LM head at
    completion positions only) give the straightforward path's per-token log-probs, loss and gradient."""
    llm, prompt = _one_prompt(name, demo_full, index=1)
    torch.manual_seed(0)
    G = 4
    completion, _ = rollout.sample_group(llm, prompt, G, max_new_tokens=10)
    completion[1, 4] = llm.eot_id  # an early end: masking is exercised
    mask = M.completion_mask(completion, llm.eot_id)
    slow_batch, fast_batch = rollout.repeat_rows(prompt, G), rollout.repeat_rows(rollout.encode_videos(llm, prompt), G)
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


@pytest.mark.parametrize("name", demo.TINY_MODELS)
def test_image_prompt_fast_path_equals_straightforward(name, image_records):
    """An image record (two images) through the fast path: its images are encoded once (no pixels left in the update's
    inputs), greedy tokens equal generate's, and the update's per-token log-probs equal the straightforward path's."""
    llm = M.load_model(name, device="cpu", dtype="fp32")
    prompt = D.collate(llm, image_records[1:], structured=True, with_target=False)
    encoded = rollout.encode_videos(llm, prompt)
    assert "pixel_values" in prompt["model_keys"] and "pixel_values" not in encoded["model_keys"]
    assert len(encoded["mm_encoder_outputs"]["image"].pooler_output) == 2  # one feature tensor per image
    expected, _ = M.generate(llm, prompt, max_new_tokens=8)
    fast, _ = rollout.sample_group(llm, encoded, 2, max_new_tokens=8, do_sample=False)
    assert torch.equal(fast, expected.expand(2, -1))
    torch.manual_seed(0)
    G = 3
    completion, _ = rollout.sample_group(llm, encoded, G, max_new_tokens=8)
    mask = M.completion_mask(completion, llm.eot_id)
    with torch.no_grad():
        slow = bench.straightforward_logprobs(llm, rollout.repeat_rows(prompt, G), completion, mask)
        quick = M.completion_logprobs(llm, rollout.repeat_rows(encoded, G), completion, mask)
    assert (slow[mask] < 0).all()
    torch.testing.assert_close(quick, slow, atol=1e-5, rtol=0)
