"""Tests of alarm.py on the three tiny families: alarm ids and placement after the processor's expansion, the
embedding swap, ATC logits and the AT-SFT loss against independent hand computations, and a full embedding table
grown for the two tokens.

Positions are located here independently (conftest.py's plain scans over the token ids), never with
SafetyAlarm.positions."""

import itertools
import random

import pytest
import torch

import data
import model
from alarm import (ALARM_FILE, TEXTUAL_ALARM, VISUAL_ALARM, SafetyAlarm, add_alarm_tokens, at_sft_loss, auroc,
                   fit_threshold)
from conftest import hand_bce, hand_positions, ids_of, last_index, model_inputs, real_tokens

QWEN_FAMILIES = ("tiny-qwen2.5-vl", "tiny-qwen3-vl")

# -----------------------------------------------------------------------------
# alarm ids and positions after the processor's expansion


def test_alarm_ids_resolved_at_run_time(llm):
    ids = ids_of(llm)
    assert llm.alarm.visual_id == ids["vis"] and llm.alarm.textual_id == ids["txt"]
    assert ids["vis"] != ids["txt"]
    others = {ids["video"], llm.model.config.image_token_id, ids["pad"], ids["im_end"], ids["im_start"],
              ids["vstart"], ids["vend"]}
    assert not others & {ids["vis"], ids["txt"]}
    # both are single special tokens that survive tokenisation inside text
    enc = llm.tokenizer("abc" + VISUAL_ALARM + "def" + TEXTUAL_ALARM, add_special_tokens=False)["input_ids"]
    assert enc.count(ids["vis"]) == 1 and enc.count(ids["txt"]) == 1
    # the embedding table has a row for each
    assert max(ids["vis"], ids["txt"]) < llm.model.get_input_embeddings().num_embeddings


def test_alarm_positions_after_expansion(llm, tiny_name, sft_batch, mixed_records):
    ids = ids_of(llm)
    tok = llm.tokenizer
    B = len(mixed_records)
    assert sft_batch["has_alarm"] is True
    lengths = sft_batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "the batch should mix lengths (left padding exercised)"
    for row, rec in enumerate(mixed_records):
        _, seq = real_tokens(sft_batch, row)
        assert seq.count(ids["vis"]) == 1 and seq.count(ids["txt"]) == 1
        p_v, p_t = seq.index(ids["vis"]), seq.index(ids["txt"])
        # textual alarm: last token of the user turn, right before the user turn's <|im_end|>
        assert seq[p_t + 1] == ids["im_end"]
        starts = [i for i, t in enumerate(seq) if t == ids["im_start"]]
        assert len(starts) == 3  # system, user, assistant
        assert starts[1] < p_t < starts[2]
        assert tok.decode(seq[starts[1]:p_t + 2]).startswith("<|im_start|>user\n")
        assert tok.decode(seq[p_t + 2:starts[2] + 1]) == "\n<|im_start|>"
        assert tok.decode(seq[starts[1]:p_t]).replace(VISUAL_ALARM, "").rstrip().endswith(rec.query.strip())
        if rec.video is None:  # text-only: both right before <|im_end|>, no video tokens at all
            assert p_v == p_t - 1
            assert ids["video"] not in seq
            continue
        assert ids["video"] in seq
        last_pad = last_index(seq, ids["video"])
        assert p_v > last_pad and ids["video"] not in seq[p_v:]
        assert p_v < p_t
        if tiny_name in QWEN_FAMILIES:
            # right after the <|vision_end|> that closes the whole video block
            between = seq[last_pad + 1:p_v]
            assert between and all(t == ids["vend"] for t in between)
            assert seq[p_v + 1] != ids["vend"]
            assert seq[:p_v].count(ids["vstart"]) == seq[:p_v].count(ids["vend"])  # block closed
        else:  # VideoLLaMA3: right after the last <|video_pad|>
            assert p_v == last_pad + 1
    # the model's own locator agrees with the hand scan
    pv, pt = hand_positions(llm, sft_batch)
    mv, mt = llm.alarm.positions(sft_batch["input_ids"])
    assert torch.equal(mv.cpu(), pv) and torch.equal(mt.cpu(), pt)
    assert pv.shape == (B,)


# -----------------------------------------------------------------------------
# the embedding swap


def test_embedding_swap(llm, sft_batch):
    ids = ids_of(llm)
    emb = llm.model.get_input_embeddings()
    input_ids = sft_batch["input_ids"]
    vec = llm.alarm.vectors.detach()
    assert not torch.allclose(vec[0], emb.weight[ids["vis"]]) and not torch.allclose(vec[1], emb.weight[ids["txt"]])
    with torch.no_grad():
        out = emb(input_ids)  # (B, T, H), with the hook
    is_v, is_t = input_ids == ids["vis"], input_ids == ids["txt"]
    assert is_v.sum() == input_ids.shape[0] and is_t.sum() == input_ids.shape[0]
    assert torch.equal(out[is_v], vec[0].expand(int(is_v.sum()), -1))
    assert torch.equal(out[is_t], vec[1].expand(int(is_t.sum()), -1))
    other = ~(is_v | is_t)
    assert torch.equal(out[other], emb.weight.detach()[input_ids[other]])

    # and the language model really receives them in a full multimodal forward
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = llm.model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            llm.forward(sft_batch, need_lm=False)
    finally:
        handle.remove()
    e = seen["embeds"]  # (B, T, H)
    assert torch.equal(e[is_v], vec[0].expand(int(is_v.sum()), -1))
    assert torch.equal(e[is_t], vec[1].expand(int(is_t.sum()), -1))
    plain = other & (input_ids != ids["video"])
    assert torch.equal(e[plain], emb.weight.detach()[input_ids[plain]])
    # video positions carry visual features, not the <|video_pad|> row
    is_video = input_ids == ids["video"]
    assert not torch.allclose(e[is_video][0], emb.weight[ids["video"]])


# -----------------------------------------------------------------------------
# ATC logits and the AT-SFT loss against independent computations


def test_atc_logits_match_hand_heads(llm, sft_batch):
    with torch.no_grad():
        res = llm.forward(sft_batch)
        hidden = llm.model.model(**model_inputs(sft_batch), use_cache=False).last_hidden_state  # (B, T, H)
    assert torch.equal(res["hidden"], hidden)
    pv, pt = hand_positions(llm, sft_batch)
    rows = torch.arange(hidden.shape[0])
    hv, ht = hidden[rows, pv], hidden[rows, pt]  # (B, H)
    head_v, head_t = llm.alarm.head_v, llm.alarm.head_t
    exp_v = (hv @ head_v.weight.detach().T).squeeze(-1) + head_v.bias.detach()  # (B,)
    exp_t = (ht @ head_t.weight.detach().T).squeeze(-1) + head_t.bias.detach()
    assert res["logit_v"].shape == (hidden.shape[0],) and res["logit_t"].shape == (hidden.shape[0],)
    torch.testing.assert_close(res["logit_v"], exp_v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(res["logit_t"], exp_t, atol=1e-6, rtol=1e-6)
    # off-by-one positions would give other values
    assert not torch.allclose(res["logit_v"], (hidden[rows, pv - 1] @ head_v.weight.detach().T).squeeze(-1)
                              + head_v.bias.detach())


def test_at_sft_loss_hand_values():
    logit_v = torch.tensor([2.0, -1.0, 0.5])
    logit_t = torch.tensor([-3.0, 0.0, 1.5])
    yv, yt = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])
    lm = torch.tensor(1.25)
    loss, parts = at_sft_loss(lm, logit_v, logit_t, yv, yt, lambda_v=0.3, lambda_t=0.7)
    torch.testing.assert_close(loss.double(), 1.25 + 0.3 * hand_bce(logit_v, yv) + 0.7 * hand_bce(logit_t, yt))
    loss, _ = at_sft_loss(lm, logit_v, logit_t, yv, yt)  # defaults λ1 = λ2 = 0.1
    torch.testing.assert_close(loss.double(), 1.25 + 0.1 * hand_bce(logit_v, yv) + 0.1 * hand_bce(logit_t, yt))


# -----------------------------------------------------------------------------
# a checkpoint without spare rows


def test_add_alarm_tokens_grows_a_full_table(tiny_name, mixed_records):
    """A checkpoint without spare embedding rows gets its table (and LM head) grown for the two tokens."""
    llm = model.load_model(tiny_name, device="cpu", dtype=torch.float32, with_alarm=False)
    n = len(llm.tokenizer)
    llm.model.resize_token_embeddings(n)  # no spare rows left
    llm.alarm = add_alarm_tokens(llm.model, llm.tokenizer)
    assert {llm.alarm.visual_id, llm.alarm.textual_id} == {n, n + 1}
    assert llm.model.get_input_embeddings().num_embeddings == n + 2
    assert llm.model.get_output_embeddings().weight.shape[0] == n + 2
    batch = data.collate(llm, mixed_records, structured=False, with_target=True)
    with torch.no_grad():
        res = llm.forward(batch)
    assert torch.isfinite(res["lm_loss"]) and res["logit_v"].shape == (len(mixed_records),)


# -----------------------------------------------------------------------------
# calibration: AUROC and the fitted threshold, against hand computations; the threshold saved with the heads


def test_auroc_by_hand():
    # positives 0.9, 0.3, 0.5 vs negatives 0.9, 0.1. Pairs won: (0.9 vs 0.9) tie = 0.5, 0.9 > 0.1 = 1,
    # 0.3 < 0.9 = 0, 0.3 > 0.1 = 1, 0.5 < 0.9 = 0, 0.5 > 0.1 = 1  ->  3.5 / 6
    assert auroc([1, 0, 1, 0, 1], [0.9, 0.9, 0.3, 0.1, 0.5]) == pytest.approx(3.5 / 6)
    assert auroc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert auroc([1, 0], [0.5, 0.5]) == 0.5
    assert auroc([1, 1], [0.3, 0.7]) is None  # one class: undefined


def test_auroc_matches_pairwise_count():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 40)
        y = [rng.randint(0, 1) for _ in range(n)]
        s = [rng.choice([0.1, 0.2, 0.5, 0.7, rng.random()]) for _ in range(n)]  # many ties
        pos = [b for a, b in zip(y, s) if a]
        neg = [b for a, b in zip(y, s) if not a]
        if not pos or not neg:
            continue
        wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
        assert auroc(y, s) == pytest.approx(wins / (len(pos) * len(neg)))


def test_fit_threshold_by_hand():
    # sorted: .1 (safe) .35 (harmful) .4 (safe) .8 (harmful); gaps' midpoints .225, .375, .6:
    #   .225: harmful {.35,.4,.8}: TPR 2/2, TNR 1/2 -> BA .75;  .375: {.4,.8}: TPR 1/2, TNR 1/2 -> .5;
    #   .6: {.8}: TPR 1/2, TNR 2/2 -> .75.  Tie .225 / .6: the one nearer 0.5 is .6
    thr, note = fit_threshold([0, 1, 0, 1], [0.1, 0.35, 0.4, 0.8])
    assert thr == pytest.approx(0.6) and "balanced accuracy 0.7500" in note
    assert fit_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])[0] == pytest.approx(0.45)  # separable: the gap's middle
    # tied scores across labels: .3 holds one of each; gaps .2 (BA (2/2 + 1/3)/2 = 2/3) and .5 (BA (1/2 + 3/3)/2 = 3/4)
    assert fit_threshold([0, 0, 1, 1, 0], [0.1, 0.3, 0.3, 0.7, 0.3])[0] == pytest.approx(0.5)
    # a skewed split (4 harmful, 1 safe): gaps .25 / .5 / .75 / .85 give BA .375 / .875 / .75 / .625
    assert fit_threshold([1, 1, 1, 0, 1], [0.9, 0.8, 0.7, 0.3, 0.2])[0] == pytest.approx(0.5)
    for labels, scores, why in (([1, 1], [0.2, 0.9], "all 2 held-out records are harmful"),
                                ([0], [0.7], "all 1 held-out records are safe"), ([], [], "no held-out records"),
                                ([0, 1], [0.4, 0.4], "scores are equal"),
                                ([1, 1, 0, 0], [0.1, 0.2, 0.7, 0.9], "no threshold beats")):  # ranks reversed
        thr, note = fit_threshold(labels, scores)
        assert thr == 0.5 and note.startswith("default 0.5") and why in note, note


def test_fitted_threshold_is_optimal_against_brute_force():
    rng = random.Random(1)
    for _ in range(30):
        n = rng.randint(2, 30)
        y = [rng.randint(0, 1) for _ in range(n)]
        s = [rng.choice([0.2, 0.5, 0.6, rng.random()]) for _ in range(n)]
        if len(set(y)) < 2 or len(set(s)) < 2:
            continue
        ba = lambda t: (sum(p >= t for p, v in zip(s, y) if v) / sum(y) + sum(p < t for p, v in zip(s, y) if not v)
                        / (n - sum(y))) / 2
        best = max(ba(t) for t in [x + 1e-9 for x in s])  # every distinct way to cut the split
        thr, _ = fit_threshold(y, s)
        assert thr == 0.5 if best <= 0.5 else ba(thr) == pytest.approx(best)


def test_thresholds_round_trip_through_save_and_load(tmp_path):
    a = SafetyAlarm(8, 5, 6)
    a.thresholds, a.threshold_notes = {"v": 0.1 + 0.2, "t": 0.73}, {"v": "cold_start: fitted", "t": "cold_start: x"}
    a.save(str(tmp_path))
    b = SafetyAlarm(8, 5, 6)
    b.load_state(str(tmp_path))
    assert b.thresholds == {"v": 0.1 + 0.2, "t": 0.73} and b.threshold_notes == a.threshold_notes  # exact floats
    from safetensors.torch import save_file  # a file written before thresholds existed: 0.5, and it says so
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / ALARM_FILE))
    b.load_state(str(tmp_path))
    assert b.thresholds == {"v": 0.5, "t": 0.5} and "before calibration" in b.threshold_notes["t"]
