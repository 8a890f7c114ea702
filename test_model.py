"""Tests of model.py on the three tiny families: alarm placement after the processor's expansion, the
embedding swap, ATC logits and the AT-SFT loss against independent hand computations, what gets gradients,
checkpoint round trips, generation, and the plain (no alarm) path.

Positions are located here independently (plain Python over the token ids), never with SafetyAlarm.positions.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import data
import model
from model import TEXTUAL_ALARM, VISUAL_ALARM

QWEN_FAMILIES = ("tiny-qwen2.5-vl", "tiny-qwen3-vl")


# -----------------------------------------------------------------------------
# helpers (independent of the code under test)


def ids_of(llm):
    """The ids that matter, looked up in the tokenizer's vocabulary."""
    vocab = llm.tokenizer.get_vocab()
    return dict(vis=vocab[VISUAL_ALARM], txt=vocab[TEXTUAL_ALARM], video=llm.model.config.video_token_id,
                im_end=vocab["<|im_end|>"], im_start=vocab["<|im_start|>"], pad=llm.tokenizer.pad_token_id,
                vstart=vocab.get("<|vision_start|>"), vend=vocab.get("<|vision_end|>"))


def real_tokens(batch, row):
    """(offset, list of ids) of one row without its left padding."""
    mask = batch["attention_mask"][row].tolist()
    off = mask.index(1)
    assert all(mask[off:]), "padding must be on the left only"
    return off, batch["input_ids"][row, off:].tolist()


def last_index(seq, value):
    return max(i for i, t in enumerate(seq) if t == value)


def hand_positions(llm, batch):
    """(B,), (B,) absolute positions of the visual / textual alarm in each row, found by a plain scan."""
    ids = ids_of(llm)
    pv, pt = [], []
    for row in range(batch["input_ids"].shape[0]):
        off, seq = real_tokens(batch, row)
        pv.append(off + last_index(seq, ids["vis"]))
        pt.append(off + last_index(seq, ids["txt"]))
    return torch.tensor(pv), torch.tensor(pt)


def model_inputs(batch):
    return {k: batch[k] for k in batch["model_keys"]}


def hand_bce(logit, y):
    """-(y log σ(x) + (1-y) log(1-σ(x))), mean over the batch, in float64."""
    p = torch.sigmoid(logit.double())
    y = y.double()
    return (-(y * torch.log(p) + (1 - y) * torch.log(1 - p))).mean()


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


def test_lm_loss_and_at_sft_loss_match_reference(llm, sft_batch):
    labels = sft_batch["labels"]
    with torch.no_grad():
        res = llm.forward(sft_batch)
        full = llm.model(**model_inputs(sft_batch), use_cache=False).logits.float()  # (B, T, V), all positions
    # reference: next-token cross-entropy over the full logits, shifted, mean over label tokens
    logits, target = full[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    mask = target != -100
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    ref_lm = (nll * mask).sum() / mask.sum()
    assert res["n_tokens"] == int(mask.sum()) == int((labels != -100).sum())
    torch.testing.assert_close(res["lm_loss"].double(), ref_lm, atol=1e-5, rtol=1e-5)

    yv, yt = sft_batch["video_label"], sft_batch["text_label"]
    assert 0 < yv.sum() < len(yv) or 0 < yt.sum() < len(yt)  # labels are mixed
    loss, parts = model.at_sft_loss(res["lm_loss"], res["logit_v"], res["logit_t"], yv, yt)
    bce_v, bce_t = hand_bce(res["logit_v"], yv), hand_bce(res["logit_t"], yt)
    expected = ref_lm + 0.1 * bce_v + 0.1 * bce_t  # L = L_base + λ1·BCE_v + λ2·BCE_t
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["atc_v"].double(), bce_v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(parts["atc_t"].double(), bce_t, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(parts["lm"], res["lm_loss"])


def test_at_sft_loss_hand_values():
    logit_v = torch.tensor([2.0, -1.0, 0.5])
    logit_t = torch.tensor([-3.0, 0.0, 1.5])
    yv, yt = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])
    lm = torch.tensor(1.25)
    loss, parts = model.at_sft_loss(lm, logit_v, logit_t, yv, yt, lambda_v=0.3, lambda_t=0.7)
    torch.testing.assert_close(loss.double(), 1.25 + 0.3 * hand_bce(logit_v, yv) + 0.7 * hand_bce(logit_t, yt))
    loss, _ = model.at_sft_loss(lm, logit_v, logit_t, yv, yt)  # defaults λ1 = λ2 = 0.1
    torch.testing.assert_close(loss.double(), 1.25 + 0.1 * hand_bce(logit_v, yv) + 0.1 * hand_bce(logit_t, yt))


# -----------------------------------------------------------------------------
# what gets gradients, and the optimizer's parameter groups


@pytest.mark.parametrize("train_llm,train_alarm,train_heads",
                         [(True, True, True), (False, True, False), (True, False, True), (False, False, True)])
def test_gradients_reach_only_trainable(llm, sft_batch, train_llm, train_alarm, train_heads):
    m, alarm = llm.model, llm.alarm
    llm_ids = {id(p) for p in m.model.language_model.parameters()} | {id(p) for p in m.lm_head.parameters()}
    llm_params = [p for p in m.parameters() if id(p) in llm_ids]
    vision_params = [p for p in m.parameters() if id(p) not in llm_ids]  # encoder + projector
    heads = list(alarm.head_v.parameters()) + list(alarm.head_t.parameters())
    assert llm_params and vision_params
    everything = list(m.parameters()) + list(alarm.parameters())
    try:
        model.set_trainable(llm, train_llm=train_llm, train_alarm=train_alarm, train_heads=train_heads)
        for p in everything:
            p.grad = None
        res = llm.forward(sft_batch)
        loss, _ = model.at_sft_loss(res["lm_loss"], res["logit_v"], res["logit_t"],
                                    sft_batch["video_label"], sft_batch["text_label"])
        loss.backward()
        assert all(not p.requires_grad and p.grad is None for p in vision_params)
        if train_llm:
            assert all(p.grad is not None for p in llm_params)
            assert any(p.grad.abs().sum() > 0 for p in llm_params)
        else:
            assert all(p.grad is None for p in llm_params)
        if train_alarm:
            assert alarm.vectors.grad is not None
            assert (alarm.vectors.grad.abs().sum(dim=1) > 0).all()  # both vectors are used
        else:
            assert alarm.vectors.grad is None
        if train_heads:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
        else:
            assert all(p.grad is None for p in heads)

        groups = model.param_groups(llm, lr_llm=1e-6, lr_alarm=1e-5, lr_heads=2e-5, weight_decay=0.0)
        names = [g["name"] for g in groups]
        expected = [n for n, on in (("llm", train_llm), ("alarm", train_alarm), ("heads", train_heads)) if on]
        assert names == expected
        lrs = {"llm": 1e-6, "alarm": 1e-5, "heads": 2e-5}
        assert all(g["lr"] == lrs[g["name"]] and g["weight_decay"] == 0.0 for g in groups)
        grouped = [id(p) for g in groups for p in g["params"]]
        assert len(grouped) == len(set(grouped))
        assert set(grouped) == {id(p) for p in everything if p.requires_grad}
        by_name = {g["name"]: {id(p) for p in g["params"]} for g in groups}
        if train_llm:
            assert by_name["llm"] == llm_ids
        if train_alarm:
            assert by_name["alarm"] == {id(alarm.vectors)}
        if train_heads:
            assert by_name["heads"] == {id(p) for p in heads}
        torch.optim.AdamW(groups)  # a valid optimizer spec
    finally:
        model.set_trainable(llm, train_llm=False, train_alarm=False, train_heads=False)
        for p in everything:
            p.grad = None


# -----------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip(tiny_name, mixed_records, tmp_path):
    llm = model.load_model(tiny_name, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # make everything that is saved differ from the base model
        llm.alarm.vectors.copy_(torch.randn(llm.alarm.vectors.shape, generator=g))
        for p in list(llm.alarm.head_v.parameters()) + list(llm.alarm.head_t.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
        llm.model.lm_head.weight.add_(0.05 * torch.randn(llm.model.lm_head.weight.shape, generator=g))
        w = llm.model.model.language_model.layers[0].mlp.down_proj.weight
        w.add_(0.05 * torch.randn(w.shape, generator=g))
    batch = data.collate(llm, mixed_records, structured=False, with_target=True)
    with torch.no_grad():
        r1 = llm.forward(batch)
    out = str(tmp_path / "ckpt")
    model.save_checkpoint(llm, out, meta={"stage": "at_sft", "step": 3})

    files = os.listdir(out)
    assert model.ALARM_FILE in files
    assert any(f.endswith(".safetensors") and f != model.ALARM_FILE for f in files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]

    llm2 = model.load_model(out, device="cpu", dtype=torch.float32)
    assert llm2.meta == {"stage": "at_sft", "step": 3}
    assert (llm2.alarm.visual_id, llm2.alarm.textual_id) == (llm.alarm.visual_id, llm.alarm.textual_id)
    assert torch.equal(llm2.alarm.vectors, llm.alarm.vectors)
    for a, b in zip(llm.alarm.state_dict().values(), llm2.alarm.state_dict().values()):
        assert torch.equal(a, b)
    batch2 = data.collate(llm2, mixed_records, structured=False, with_target=True)
    assert torch.equal(batch2["input_ids"], batch["input_ids"])
    with torch.no_grad():
        r2 = llm2.forward(batch2)
    for k in ("hidden", "logit_v", "logit_t", "lm_loss"):
        assert torch.equal(r1[k], r2[k]), k

    # a checkpoint that has its alarm keeps it even when asked for none
    llm3 = model.load_model(out, device="cpu", dtype=torch.float32, with_alarm=False)
    assert llm3.alarm is not None and torch.equal(llm3.alarm.vectors, llm.alarm.vectors)


# -----------------------------------------------------------------------------
# generation


def test_completion_mask_hand_made():
    eos = 9
    completion = torch.tensor([[1, 2, 9, 3, 9],
                               [9, 1, 1, 1, 1],
                               [1, 2, 3, 4, 5],
                               [1, 9, 9, 2, 2]])
    expected = torch.tensor([[1, 1, 1, 0, 0],
                             [1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1],
                             [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(model.completion_mask(completion, eos), expected)
    assert model.completion_tokens(completion, eos) == [[1, 2, 9], [9], [1, 2, 3, 4, 5], [1, 9]]


def test_generate_with_alarm_prompt(llm, mixed_records):
    ids = ids_of(llm)
    batch = data.collate(llm, mixed_records[1:], structured=True, with_target=False)  # SH, SafeQ, text-only
    B = batch["input_ids"].shape[0]
    assert ((batch["input_ids"] == ids["vis"]).sum(1) == 1).all()
    assert ((batch["input_ids"] == ids["txt"]).sum(1) == 1).all()
    vocab = llm.model.get_output_embeddings().weight.shape[0]
    assert vocab > ids["txt"]

    # push the LM head towards the alarm tokens; end row 0 at step 2 and the others at step 3
    calls = {"n": 0}

    def steer(module, inputs, logits):
        calls["n"] += 1
        logits = logits.clone()
        logits[..., ids["vis"]] += 1e4
        logits[..., ids["txt"]] += 1e4
        if calls["n"] == 2:
            logits[0, ..., ids["im_end"]] += 1e5
        if calls["n"] == 3:
            logits[..., ids["im_end"]] += 1e5
        return logits

    swapped = []  # the alarm vectors are in the embeddings the model sees while generating

    def spy(module, inputs, embeds):
        hit = inputs[0] == ids["vis"]
        if hit.any():
            swapped.append(torch.equal(embeds[hit][0], llm.alarm.vectors.detach()[0]))

    h1 = llm.model.lm_head.register_forward_hook(steer)
    h2 = llm.model.get_input_embeddings().register_forward_hook(spy)
    try:
        # sanity: without the ban, the steered model does emit alarm ids
        with torch.no_grad():
            raw = llm.model.generate(**model_inputs(batch), max_new_tokens=1, do_sample=False,
                                     eos_token_id=ids["im_end"], pad_token_id=ids["pad"])
        assert (raw[:, -1] == ids["vis"]).any() or (raw[:, -1] == ids["txt"]).any()
        calls["n"] = 0
        swapped.clear()
        llm.model.train()
        completion, texts = model.generate(llm, batch, max_new_tokens=6)
        assert llm.model.training  # mode restored
    finally:
        llm.model.eval()
        h1.remove()
        h2.remove()
    assert swapped and all(swapped)
    assert completion.shape == (B, 3)
    assert not (completion == ids["vis"]).any() and not (completion == ids["txt"]).any()
    assert completion[0, 1] == ids["im_end"] and completion[0, 2] == ids["pad"]  # padded after its EOS
    assert (completion[1:, 2] == ids["im_end"]).all()
    mask = model.completion_mask(completion, ids["im_end"])
    assert mask[0].tolist() == [True, True, False] and mask[1:].all()
    assert len(texts) == B and all(isinstance(t, str) for t in texts)
    assert not any(VISUAL_ALARM in t or TEXTUAL_ALARM in t for t in texts)
    assert texts[0] == llm.tokenizer.decode(completion[0, :1], skip_special_tokens=True)


# -----------------------------------------------------------------------------
# the plain model (evaluation baseline)


def test_plain_model_without_alarm(tiny_name, llm, mixed_records):
    plain = model.load_model(tiny_name, device="cpu", dtype=torch.float32, with_alarm=False)
    assert plain.alarm is None
    vocab = plain.tokenizer.get_vocab()
    assert VISUAL_ALARM not in vocab and TEXTUAL_ALARM not in vocab
    batch = data.collate(plain, mixed_records, structured=False, with_target=True)
    assert batch["has_alarm"] is False
    ids = ids_of(llm)
    assert not (batch["input_ids"] == ids["vis"]).any() and not (batch["input_ids"] == ids["txt"]).any()
    decoded = plain.tokenizer.batch_decode(batch["input_ids"])
    assert not any(VISUAL_ALARM in d or TEXTUAL_ALARM in d for d in decoded)
    for row, rec in enumerate(mixed_records):  # the user turn ends with the query itself
        _, seq = real_tokens(batch, row)
        starts = [i for i, t in enumerate(seq) if t == ids["im_start"]]
        user_end = seq.index(ids["im_end"], starts[1])
        assert plain.tokenizer.decode(seq[starts[1]:user_end]).endswith(rec.query.strip())
    with torch.no_grad():
        res = plain.forward(batch)
    assert res["logit_v"] is None and res["logit_t"] is None and torch.isfinite(res["lm_loss"])

    # the alarm model asked for no alarm gives the same token ids as the plain model
    batch_off = data.collate(llm, mixed_records, structured=False, with_target=True, alarm=False)
    assert batch_off["has_alarm"] is False
    assert torch.equal(batch_off["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert llm.forward(batch_off)["logit_v"] is None


def test_add_alarm_tokens_grows_a_full_table(tiny_name, mixed_records):
    """A checkpoint without spare embedding rows gets its table (and LM head) grown for the two tokens."""
    llm = model.load_model(tiny_name, device="cpu", dtype=torch.float32, with_alarm=False)
    n = len(llm.tokenizer)
    llm.model.resize_token_embeddings(n)  # no spare rows left
    llm.alarm = model.add_alarm_tokens(llm.model, llm.tokenizer)
    assert {llm.alarm.visual_id, llm.alarm.textual_id} == {n, n + 1}
    assert llm.model.get_input_embeddings().num_embeddings == n + 2
    assert llm.model.get_output_embeddings().weight.shape[0] == n + 2
    batch = data.collate(llm, mixed_records, structured=False, with_target=True)
    with torch.no_grad():
        res = llm.forward(batch)
    assert torch.isfinite(res["lm_loss"]) and res["logit_v"].shape == (len(mixed_records),)
