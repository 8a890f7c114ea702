"""Tests of model.py on the three tiny families: L_base against a full-logits reference, what gets gradients and
which parameter groups, checkpoint round trips, generation with alarm prompts, and the plain (no alarm) path."""

import dataclasses
import json
import os

import pytest
import torch

import data
import demo
import model
from alarm import ALARM_FILE, TEXTUAL_ALARM, VISUAL_ALARM, at_sft_loss
from conftest import hand_bce, ids_of, model_inputs, real_tokens

# -----------------------------------------------------------------------------
# the LM loss, and the AT-SFT loss on it


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
    loss, parts = at_sft_loss(res["lm_loss"], res["logit_v"], res["logit_t"], yv, yt)
    bce_v, bce_t = hand_bce(res["logit_v"], yv), hand_bce(res["logit_t"], yt)
    expected = ref_lm + 0.1 * bce_v + 0.1 * bce_t  # L = L_base + λ1·BCE_v + λ2·BCE_t
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["atc_v"].double(), bce_v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(parts["atc_t"].double(), bce_t, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(parts["lm"], res["lm_loss"])


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
        loss, _ = at_sft_loss(res["lm_loss"], res["logit_v"], res["logit_t"],
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
    assert ALARM_FILE in files
    assert any(f.endswith(".safetensors") and f != ALARM_FILE for f in files)
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


# -----------------------------------------------------------------------------
# log-probs of completions: sampling time == training forward


@pytest.mark.parametrize("name", demo.TINY_MODELS)
def test_logprobs_match_generation(name, demo_full):
    torch.manual_seed(0)
    llm = model.load_model(name, device="cpu", dtype="fp32")
    records = data.load_records(os.path.join(demo_full, "grpo.jsonl"))
    records = sorted(records[:12], key=lambda r: len(r.query))[::4]  # different lengths: real left padding
    batch = data.collate(llm, records, structured=True, with_target=False)
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
    mask = model.completion_mask(completion, llm.eot_id)
    assert mask[0].tolist() == [True] * 6 + [False] * 6 and mask[1:].all()
    sampled = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B, L, V): raw logits, no warpers
    expected = sampled.gather(2, completion[..., None]).squeeze(-1) * mask  # (B, L)

    llm.model.train()  # as in the update
    with torch.no_grad():
        old = model.completion_logprobs(llm, batch, completion, mask, chunk=5)  # as recorded in the rollout
        other_chunks = model.completion_logprobs(llm, batch, completion, mask, chunk=1024)
    new = model.completion_logprobs(llm, batch, completion, mask, chunk=5)  # the training forward, with grad
    assert new.requires_grad and old.shape == completion.shape
    torch.testing.assert_close(old, expected, atol=1e-4, rtol=0)  # fp32: generation and training agree
    torch.testing.assert_close(other_chunks, old, atol=1e-6, rtol=0)  # chunking changes only rounding
    assert torch.equal(torch.exp(new.detach() - old)[mask], torch.ones(int(mask.sum())))  # ρ = 1 exactly
    assert (old[~mask] == 0).all()
    new.sum().backward()  # gradients reach the LLM through the chunked, checkpointed LM head
    assert llm.model.lm_head.weight.grad is not None and llm.model.lm_head.weight.grad.abs().sum() > 0


def test_checkpoint_serves_without_project_code(tiny_name, mixed_records, tmp_path):
    """A saved checkpoint loaded with plain transformers (no alarm hook, its own generation_config) greedy-decodes
    exactly the project's tokens from the project's inputs: the alarm vectors sit in the embedding rows."""
    from transformers import AutoModelForImageTextToText

    llm = model.load_model(tiny_name, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        llm.alarm.vectors.copy_(torch.randn(llm.alarm.vectors.shape, generator=g))
    batch = data.collate(llm, mixed_records[1:], structured=True, with_target=False)
    completion, _ = model.generate(llm, batch, max_new_tokens=6)
    out = str(tmp_path / "ckpt")
    model.save_checkpoint(llm, out, meta={"stage": "at_sft"})

    plain = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert set(plain.generation_config.suppress_tokens) == set(model.banned_ids(llm))
    pad = llm.tokenizer.pad_token_id  # batches are padded with it: never generated, served or not
    assert pad != llm.eot_id and pad in plain.generation_config.suppress_tokens
    gc = plain.generation_config  # eval's decoding: greedy, no penalty, its completion limit (not transformers' 20)
    assert (gc.do_sample, gc.repetition_penalty, gc.max_new_tokens) == (False, 1.0, model.MAX_NEW_TOKENS)
    inputs = {k: batch[k] for k in batch["model_keys"]}
    with torch.no_grad():
        ids = plain.generate(**inputs, max_new_tokens=6)[:, inputs["input_ids"].shape[1]:]
    eot = llm.eot_id
    assert model.completion_tokens(ids, eot) == model.completion_tokens(completion, eot)

    # a checkpoint written before this (embedding rows not the vectors, base generation_config) is converted on load
    emb = plain.get_input_embeddings().weight
    rows = [llm.alarm.visual_id, llm.alarm.textual_id]
    with torch.no_grad():
        emb[rows] = 0.0
    plain.generation_config.suppress_tokens = None
    old = str(tmp_path / "old")
    plain.save_pretrained(old)
    llm.processor.save_pretrained(old)
    llm.alarm.save(old)
    llm2 = model.load_model(old, device="cpu", dtype=torch.float32)
    assert torch.equal(llm2.model.get_input_embeddings().weight[rows], llm.alarm.vectors)
    assert set(llm2.model.generation_config.suppress_tokens) == set(model.banned_ids(llm))


SERVE_SCRIPT = r"""
import json, sys, torch
import transformers.video_processing_utils as vpu
from transformers import AutoModelForImageTextToText, AutoProcessor
if not vpu.is_torchcodec_usable(decode="video"):  # transformers 5 decodes a video path with torchcodec, which needs
    def fetch(self, v, sample_indices_fn=None):  # FFmpeg; without it: transformers' own decord reader, nothing else
        if isinstance(v, list):
            return list(zip(*[fetch(self, x, sample_indices_fn) for x in v]))
        return vpu.load_video(v, backend="decord", sample_indices_fn=sample_indices_fn)
    vpu.BaseVideoProcessor.fetch_videos = fetch
ckpt, query, video, video_query, short = sys.argv[1:6]
proc = AutoProcessor.from_pretrained(ckpt)
m = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
text = lambda *vis: [{"role": "user", "content": [{"type": v} for v in vis] + [{"type": "text", "text": query}]}]
got = {}
vid = lambda path: [{"role": "user", "content": [{"type": "video", "path": path},
                                                  {"type": "text", "text": video_query}]}]
for kind, msg in (("text", text()), ("video", vid(video)), ("short", vid(short))):
    enc = proc.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = m.generate(**enc, max_new_tokens=6)[0, enc["input_ids"].shape[1]:]
    got[kind] = {"input_ids": enc["input_ids"][0].tolist(), "tokens": out.tolist()}
got["prompts"] = {k: proc.apply_chat_template(text(*v), add_generation_prompt=True, tokenize=False)
                  for k, v in (("video", ["video"]), ("image", ["image"]), ("text", []))}
other = {"string": [{"role": "user", "content": query}],  # text-only as a plain string
         "text first": [{"role": "user", "content": [{"type": "text", "text": query}, {"type": "video"}]}],
         "no text": [{"role": "user", "content": [{"type": "image"}]}]}
got["prompts"].update({k: proc.apply_chat_template(v, add_generation_prompt=True, tokenize=False)
                       for k, v in other.items()})
print(json.dumps(got))
"""


def _first_frames(src: str, n: int, dest: str) -> str:
    """An mp4 of the first n frames of src, at src's frame rate."""
    import av
    import decord

    vr = decord.VideoReader(src, ctx=decord.cpu(0))
    frames = vr.get_batch(list(range(n))).asnumpy()
    with av.open(dest, "w") as container:
        stream = container.add_stream("libx264", rate=round(vr.get_avg_fps()))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return dest


@pytest.mark.parametrize("stage", ["at_sft", "cold_start", "grpo"])
def test_chat_template_serves_the_project_prompt(tiny_name, text_record, demo_records, tmp_path, stage):
    """In a process importing only transformers: the saved chat template writes build_prompt's prompt (video, image,
    text-only turns; after cold start the structured instruction is the default system turn); apply_chat_template
    tokenizes a text-only turn and a video + query turn (the video given by its path, sampled by the saved video
    processor: the demo's 4 s clip and a 3.5 s one, whose frames at 1 fps no family reads as one per second from 0)
    to the project's input_ids, and greedy generate gives the project's tokens."""
    import subprocess
    import sys

    llm = model.load_model(tiny_name, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        llm.alarm.vectors.copy_(torch.randn(llm.alarm.vectors.shape, generator=g))
    structured = stage in model.STRUCTURED_STAGES
    out = str(tmp_path / "ckpt")
    model.save_checkpoint(llm, out, meta={"stage": stage, "args": {"fps": data.FPS, "max_frames": data.MAX_FRAMES}})
    assert not llm.processor.video_processor.do_sample_frames  # the project hands the processor its own frames
    video = demo_records[0]
    short = dataclasses.replace(video, video=_first_frames(video.video, 14, str(tmp_path / "short.mp4")))  # 3.5 s
    r = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, out, text_record.query, video.video, video.query,
                        short.video],
                       capture_output=True, text=True, cwd=str(tmp_path), check=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])

    for kind, rec in (("text", text_record), ("video", video), ("short", short)):
        batch = data.collate(llm, [rec], structured=structured, with_target=False)
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        assert got[kind]["input_ids"] == ids, kind
        completion, _ = model.generate(llm, batch, max_new_tokens=6)
        assert (model.completion_tokens(torch.tensor([got[kind]["tokens"]]), llm.eot_id)
                == model.completion_tokens(completion, llm.eot_id)), kind
    cases = {"video": (True, 0), "image": (False, 1), "text": (False, 0), "string": (False, 0),
             "text first": (True, 0), "no text": (False, 1)}  # the last three: the turn as clients also send it
    for kind, (has_video, n_images) in cases.items():
        want = data.build_prompt(llm.processor, "" if kind == "no text" else text_record.query, has_video=has_video,
                                 structured=structured, alarm=True, n_images=n_images)
        assert got["prompts"][kind] == want, kind

    # the project reloads the plain template (build_prompt inserts the alarm tokens itself) and still hands the
    # processor its own frames (collate passes do_sample_frames=False over the served setting)
    llm2 = model.load_model(out, device="cpu", dtype=torch.float32)
    for rec in (text_record, video):
        batch = data.collate(llm, [rec], structured=structured, with_target=False)
        assert torch.equal(data.collate(llm2, [rec], structured=structured, with_target=False)["input_ids"],
                           batch["input_ids"])
    os.remove(os.path.join(out, model.PLAIN_TEMPLATE_FILE))  # lost: the alarms would be inserted twice, so refused
    with pytest.raises(FileNotFoundError, match="videosafety_plain_chat_template.jinja is missing"):
        model.load_model(out, device="cpu", dtype=torch.float32)


def _tied_copy(name: str, path: str) -> str:
    """The tiny model of `name` rebuilt with tie_word_embeddings=True (LM head = input embedding), fixed seed."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    src = demo.tiny_model_path(name)
    cfg = AutoConfig.from_pretrained(src)
    cfg.tie_word_embeddings = cfg.get_text_config().tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(cfg).save_pretrained(path)
    AutoProcessor.from_pretrained(src).save_pretrained(path)
    return path


def test_tied_embeddings_never_generate_alarm_or_placeholder_tokens(tiny_name, mixed_records, tmp_path):
    """With tied embeddings the alarm vectors written into the embedding rows are the LM head's rows of those tokens
    too. Plain transformers' greedy generate (generation_config.suppress_tokens) gives them, and the video / image
    placeholders, a score of -inf at every step and decodes the project's tokens; save -> load keeps the tie and
    gives the same LM loss and ATC logits."""
    from transformers import AutoModelForImageTextToText

    llm = model.load_model(_tied_copy(tiny_name, str(tmp_path / "tied")), device="cpu", dtype=torch.float32)
    assert llm.model.lm_head.weight is llm.model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # large vectors: were they not suppressed, their logits would matter
        llm.alarm.vectors.copy_(5 * torch.randn(llm.alarm.vectors.shape, generator=g))
    out = str(tmp_path / "ckpt")
    sft = data.collate(llm, mixed_records, structured=False, with_target=True)
    rows = [llm.alarm.visual_id, llm.alarm.textual_id]
    with torch.no_grad():
        before, trained_rows = llm.forward(sft), llm.model.lm_head.weight[rows].clone()
        model.save_checkpoint(llm, out, meta={"stage": "grpo"})
        after = llm.forward(sft)
    assert torch.equal(llm.model.lm_head.weight[rows], trained_rows)  # saving leaves the model being trained as it was
    assert torch.equal(before["lm_loss"], after["lm_loss"])  # (the head's alarm rows are in every log-softmax)

    batch = data.collate(llm, mixed_records[1:], structured=True, with_target=False)
    completion, _ = model.generate(llm, batch, max_new_tokens=6)
    plain = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.lm_head.weight is plain.get_input_embeddings().weight
    assert torch.equal(plain.lm_head.weight[rows], llm.alarm.vectors)  # served: the tie, the head's rows the vectors
    inputs = {k: batch[k] for k in batch["model_keys"]}
    with torch.no_grad():
        gen = plain.generate(**inputs, max_new_tokens=6, output_scores=True, return_dict_in_generate=True)
    banned = model.banned_ids(llm)
    assert set(banned) >= set(rows) | {plain.config.video_token_id, plain.config.image_token_id}
    assert all(bool(torch.isinf(s[:, banned]).all()) and bool((s[:, banned] < 0).all()) for s in gen.scores)
    eot = llm.eot_id
    ids = gen.sequences[:, inputs["input_ids"].shape[1]:]
    assert model.completion_tokens(ids, eot) == model.completion_tokens(completion, eot)

    llm2 = model.load_model(out, device="cpu", dtype=torch.float32)  # the project reloads the rows it trained with
    assert llm2.model.lm_head.weight is llm2.model.get_input_embeddings().weight
    assert torch.equal(llm2.model.lm_head.weight[rows], trained_rows)
    with torch.no_grad():
        r1, r2 = llm.forward(sft), llm2.forward(sft)
    for k in ("lm_loss", "logit_v", "logit_t"):
        assert torch.equal(r1[k], r2[k]), k
