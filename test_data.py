"""Tests of data.py: frame sampling and decoding, timestamps reaching the processor, prompts and label
masking, every kind of bad input, and the authors' formats."""

import json
import os
import re

import numpy as np
import pytest
import torch

import data
from data import DataError
from alarm import TEXTUAL_ALARM, VISUAL_ALARM
from conftest import ids_of, last_index, real_tokens, write_png

# -----------------------------------------------------------------------------
# video sampling and decoding


def write_gray_clip(path, fps, n_frames, width=64, height=32):
    """An mp4 whose frame k shows its own index: grey level 20 + 20*(k // 10) on the left half,
    20 + 20*(k % 10) on the right half (steps of 20 survive H.264 easily)."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(n_frames):
            frame = np.empty((height, width, 3), np.uint8)
            frame[:, : width // 2] = 20 + 20 * (k // 10)
            frame[:, width // 2:] = 20 + 20 * (k % 10)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_number(frame):
    """Read back the index written by write_gray_clip from a decoded (H, W, 3) frame."""
    w = frame.shape[1]
    tens = frame[4:-4, 4: w // 2 - 4].mean()
    ones = frame[4:-4, w // 2 + 4: -4].mean()
    return int(round((tens - 20) / 20)) * 10 + int(round((ones - 20) / 20))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        "4fps_4s": (write_gray_clip(str(d / "a.mp4"), 4, 16), 16),
        "30fps_3s": (write_gray_clip(str(d / "b.mp4"), 30, 90), 90),
        "1fps_100s": (write_gray_clip(str(d / "c.mp4"), 1, 100), 100),  # longer than 90 frames at 1 fps
    }


@pytest.mark.parametrize("num_frames,native,fps,max_frames,expected", [
    (16, 4, 1, 90, [0, 4, 8, 12]),
    (90, 30, 1, 90, [0, 30, 60]),
    (90, 30, 2, 90, [0, 15, 30, 45, 60, 75]),
    (7, 2, 1, 90, [0, 2, 4, 6]),
    (10, 2.5, 1, 90, [0, 2, 5, 7]),  # non-integer step: floor(0, 2.5, 5, 7.5)
    (10, 25, 1, 90, [0]),  # shorter than one second
    (20, 1, 1, 5, [0, 5, 10, 14, 19]),  # over max_frames: round(linspace(0, 19, 5))
    (100, 1, 1, 90, [round(i * 99 / 89) for i in range(90)]),
])
def test_sample_indices(num_frames, native, fps, max_frames, expected):
    idx = data.sample_indices(num_frames, native, fps, max_frames)
    assert idx.tolist() == expected


@pytest.mark.parametrize("clip,fps,max_frames,expected", [
    ("4fps_4s", 1, 90, [0, 4, 8, 12]),
    ("4fps_4s", 2, 90, [0, 2, 4, 6, 8, 10, 12, 14]),
    ("30fps_3s", 1, 90, [0, 30, 60]),
    ("1fps_100s", 1, 90, [round(i * 99 / 89) for i in range(90)]),
    ("1fps_100s", 1, 4, [0, 33, 66, 99]),
])
def test_read_video(clips, clip, fps, max_frames, expected):
    path, n = clips[clip]
    native = {"4fps_4s": 4, "30fps_3s": 30, "1fps_100s": 1}[clip]
    frames, meta = data.read_video(path, fps=fps, max_frames=max_frames, rid="r1")
    assert frames.dtype == np.uint8 and frames.shape == (len(expected), 32, 64, 3)
    assert meta.total_num_frames == n and meta.fps == pytest.approx(native)
    assert (meta.height, meta.width) == (32, 64)
    assert meta.frames_indices == expected
    assert np.allclose(meta.timestamps, [i / native for i in expected])
    assert meta.duration == pytest.approx(n / native)
    # the decoded pixels are those of the sampled source frames
    assert [frame_number(f) for f in frames] == expected


# The families' own rules, by hand (transformers' sample_frames; the served checkpoints hold fps 1, cap 90 or 4):
# VideoLLaMA3 / Qwen2.5-VL: n = clamp(seconds * fps, min_frames 4, cap), floored to the temporal patch (1 / 2),
# indices int(arange(0, total, total / n)); Qwen3-VL: n = clamp(int(seconds * fps), 4, cap), round(linspace(0,
# total - 1, n)). "7f_2fps" is 3.5 s: 3.5 frames at 1 fps, which no family reads as data.sample_indices does.
FAMILY_FRAMES = {
    ("4fps_4s", 90): {"tiny-videollama3": [0, 4, 8, 12], "tiny-qwen2.5-vl": [0, 4, 8, 12],
                      "tiny-qwen3-vl": [0, 5, 10, 15]},
    ("30fps_3s", 90): {"tiny-videollama3": [0, 22, 45, 67], "tiny-qwen2.5-vl": [0, 22, 45, 67],
                       "tiny-qwen3-vl": [0, 30, 59, 89]},
    ("1fps_100s", 4): {"tiny-videollama3": [0, 25, 50, 75], "tiny-qwen2.5-vl": [0, 25, 50, 75],
                       "tiny-qwen3-vl": [0, 33, 66, 99]},
    ("7f_2fps", 90): {"tiny-videollama3": [0, 1, 3, 5], "tiny-qwen2.5-vl": [0, 1, 3, 5],
                      "tiny-qwen3-vl": [0, 2, 4, 6]},
}


@pytest.mark.parametrize("clip,max_frames", list(FAMILY_FRAMES))
def test_frames_follow_the_model_s_own_sampler(clips, tmp_path, tiny_name, clip, max_frames):
    """collate reads the frames the model's video processor would pick itself (what a served checkpoint does with
    a video path): the family's rule, by hand, on clips whose length at 1 fps is and is not a whole count."""
    from transformers import AutoProcessor

    import demo

    path = clips[clip][0] if clip in clips else write_gray_clip(str(tmp_path / "d.mp4"), 2, 7)
    proc = AutoProcessor.from_pretrained(demo.tiny_model_path(tiny_name))
    sampler = data.frame_sampler(proc, fps=1, max_frames=max_frames)
    frames, meta = data.read_video(path, fps=1, max_frames=max_frames, rid="r1", sampler=sampler)
    want = FAMILY_FRAMES[clip, max_frames][tiny_name]
    assert meta.frames_indices == want and [frame_number(f) for f in frames] == want
    assert not proc.video_processor.do_sample_frames  # the sampler works on a copy: the processor is unchanged


def test_a_clip_the_family_cannot_sample_is_a_data_error(tmp_path):
    """Qwen2.5-VL takes frames in pairs: a one-frame clip gives it none (transformers divides by zero)."""
    from transformers import AutoProcessor

    import demo

    path = write_gray_clip(str(tmp_path / "one.mp4"), 1, 1)
    proc = AutoProcessor.from_pretrained(demo.tiny_model_path("tiny-qwen2.5-vl"))
    with pytest.raises(DataError, match=r"record r2: the model's video processor cannot sample video .*one.mp4 "
                                        r"\(1 frames at 1 fps\)"):
        data.read_video(path, rid="r2", sampler=data.frame_sampler(proc))
    assert data.read_video(path, rid="r2")[1].frames_indices == [0]  # the project's own rule reads it


def test_video_shorter_than_one_frame_at_the_fps(tmp_path):
    path = write_gray_clip(str(tmp_path / "short.mp4"), 25, 10)  # 0.4 s
    with pytest.raises(DataError, match=r"record r9: video .*short.mp4 lasts 0.4 s, shorter than one frame at --fps 1"):
        data.read_video(path, fps=1, rid="r9")
    frames, meta = data.read_video(path, fps=4, rid="r9")  # at 4 fps: one frame every 6.25, frames 0 and 6
    assert meta.frames_indices == [0, 6]


def test_real_timestamps_reach_the_processor(llm, tiny_name, clips):
    """Traps: the processor must get the sampled frames' real times (Qwen2.5-VL second_per_grid_ts,
    Qwen3-VL <t seconds>, VideoLLaMA3 'Time t s')."""
    rec = data.Record(id="c", video=clips["4fps_4s"][0], query="Describe the video.", target="ok",
                      video_label=0, text_label=0)
    for fps in (1, 2):
        batch = data.collate(llm, [rec], structured=False, with_target=False, fps=fps)
        text = llm.tokenizer.decode(batch["input_ids"][0])
        times = [k / fps for k in range(4 * fps)]  # frames sampled from a 4 s clip (16 frames at 4 fps)
        if tiny_name == "tiny-qwen3-vl":  # its own sampler: spread from the first frame to the last
            times = (np.round(np.linspace(0, 15, 4 * fps)) / 4).tolist()
        if tiny_name == "tiny-qwen2.5-vl":
            assert batch["second_per_grid_ts"].tolist() == [2 / fps]  # temporal patch 2
        elif tiny_name == "tiny-qwen3-vl":  # one stamp per pair of frames: their mean time
            stamps = [float(t) for t in re.findall(r"<([\d.]+) seconds>", text)]
            assert stamps == pytest.approx([(a + b) / 2 for a, b in zip(times[::2], times[1::2])], abs=0.051)
        else:
            stamps = [float(t) for t in re.findall(r"Time ([\d.]+)s:", text)]
            assert stamps == pytest.approx(times)


# -----------------------------------------------------------------------------
# prompts and label masking


@pytest.mark.parametrize("has_video,n_images", [(True, 0), (False, 0), (False, 2)])
def test_build_prompt_alarm_is_only_insertion(llm, has_video, n_images):
    proc = llm.processor
    kw = dict(has_video=has_video, structured=True, n_images=n_images)
    with_alarm = data.build_prompt(proc, "  Is this ok?  ", alarm=True, **kw)
    without = data.build_prompt(proc, "  Is this ok?  ", alarm=False, **kw)
    assert with_alarm.count(VISUAL_ALARM) == 1 and with_alarm.count(TEXTUAL_ALARM) == 1
    assert VISUAL_ALARM not in without and TEXTUAL_ALARM not in without
    assert with_alarm.replace(VISUAL_ALARM, "").replace(TEXTUAL_ALARM, "") == without
    assert with_alarm.endswith(TEXTUAL_ALARM + "<|im_end|>\n<|im_start|>assistant\n")
    assert with_alarm.startswith("<|im_start|>system\n" + data.STRUCTURED_INSTRUCTION + "<|im_end|>\n")
    if not has_video and not n_images:
        assert VISUAL_ALARM + TEXTUAL_ALARM + "<|im_end|>" in with_alarm
    if n_images:  # right after the last image's block, none between the images
        assert with_alarm.count(proc.image_token) == n_images
        assert with_alarm.index(VISUAL_ALARM) > with_alarm.rindex(proc.image_token)


def test_image_records_visual_alarm_after_the_last_image_token(llm, tiny_name, image_records, mixed_records):
    """Found by a plain scan of the ids: in each image row the visual alarm follows the last image token (Qwen: the
    <|vision_end|> that closes its block), every image expanded to its tokens; the textual alarm ends the user text."""
    ids = ids_of(llm)
    records = image_records + mixed_records[:1] + mixed_records[3:]  # two image rows, a video row, a text row
    batch = data.collate(llm, records, structured=True, with_target=False)
    plain = data.collate(llm, records, structured=True, with_target=False, alarm=False)
    grid = batch["image_grid_thw"]  # (n images, 3), in prompt order: 1 + 2 images
    merge = batch["image_merge_sizes"] if "image_merge_sizes" in batch else torch.full((len(grid),), 2)
    per_image = (grid.prod(dim=1) // merge ** 2).tolist()
    for row, n_expected in ((0, per_image[0]), (1, per_image[1] + per_image[2])):
        _, seq = real_tokens(batch, row)
        vis, txt = last_index(seq, ids["vis"]), last_index(seq, ids["txt"])
        assert seq.count(ids["image"]) == n_expected and seq.count(ids["vis"]) == 1
        end = last_index(seq, ids["image"])
        qwen = "qwen" in tiny_name  # Qwen wraps each image in <|vision_start|> ... <|vision_end|>
        assert vis == end + (2 if qwen else 1)
        if qwen:
            assert seq[end + 1] == ids["vend"]
        assert seq[txt + 1] == ids["im_end"] and vis < txt
        _, without = real_tokens(plain, row)
        assert [t for t in seq if t not in (ids["vis"], ids["txt"])] == without  # the alarms are the only insertion
    _, text_row = real_tokens(batch, 3)
    assert text_row[last_index(text_row, ids["vis"]) + 1] == ids["txt"]  # text only: both alarms end the text


def test_no_video_drops_images_too(llm, image_records):
    batch = data.collate(llm, image_records, structured=False, with_target=False, no_video=True)
    assert "pixel_values" not in batch and (batch["input_ids"] != ids_of(llm)["image"]).all()


def _runs(mask):
    """[(start, end)] of the True runs of a 1-D bool list."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_multi_turn_every_answer_supervised(llm, image_files, text_record):
    """A three-exchange image conversation next to a one-turn record: labels on exactly the three answers (each with
    its end-of-turn token), each right after an assistant header; the users' turns, headers and the image carry none."""
    tok = llm.tokenizer
    conv = data.Record(id="mt", video=None, query="What is this?", target="Noise.", video_label=0, text_label=0,
                       image=image_files[:1], turns=[["Is it red?", "Partly."], ["Thanks", "You are welcome."]])
    batch = data.collate(llm, [conv, text_record], structured=False, with_target=True)
    ids, labels = batch["input_ids"], batch["labels"]
    runs = _runs((labels[0] != -100).tolist())
    assert [tok.decode(ids[0, a:b]) for a, b in runs] == ["Noise.<|im_end|>", "Partly.<|im_end|>",
                                                          "You are welcome.<|im_end|>"]
    for a, b in runs:
        assert torch.equal(labels[0, a:b], ids[0, a:b])
        assert tok.decode(ids[0, :a]).endswith("<|im_start|>assistant\n")
    assert "Is it red?<|im_end|>" in tok.decode(ids[0]) and ids_of(llm)["image"] not in labels[0].tolist()
    assert tok.decode(labels[1][labels[1] != -100]) == text_record.target + "<|im_end|>"  # one turn: as before
    assert (ids[0] == ids_of(llm)["vis"]).sum() == 1 and (ids[0] == ids_of(llm)["txt"]).sum() == 1  # first turn only
    with pytest.raises(DataError, match="record mt .*multi-turn conversation is training data"):
        data.collate(llm, [conv], structured=True, with_target=False)  # never cut to a one-turn prompt
    skipped = {}
    kept = data.collate(llm, [conv, text_record], structured=True, with_target=False, skip_bad=True, skipped=skipped)
    assert [r.id for r in kept["records"]] == [text_record.id] and "mt" in " ".join(skipped.values())


def test_labels_cover_only_assistant_tokens(llm, mixed_records):
    tok = llm.tokenizer
    for structured in (False, True):
        recs = list(mixed_records)
        batch = data.collate(llm, recs, structured=structured, with_target=True)
        ids, labels, att = batch["input_ids"], batch["labels"], batch["attention_mask"]
        lengths = att.sum(1)
        assert len(set(lengths.tolist())) > 1  # rows of different lengths, left padded
        assert (att[:, -1] == 1).all() and (att[lengths.argmin(), 0] == 0)
        for row, rec in enumerate(recs):
            lab = labels[row]
            on = lab != -100
            assert torch.equal(lab[on], ids[row][on])
            pos = on.nonzero().squeeze(1)
            assert pos.tolist() == list(range(ids.shape[1] - len(pos), ids.shape[1]))  # one suffix run
            assert tok.decode(lab[on]) == rec.target + "<|im_end|>"
            assert not (on & (att[row] == 0)).any()
            # just before the labels: the assistant header, not part of the loss
            head = tok.decode(ids[row][: int(pos[0])])
            assert head.endswith("<|im_start|>assistant\n")


# -----------------------------------------------------------------------------
# bad input: each gives a DataError that says where


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


@pytest.fixture
def good(tmp_path, demo_dir):
    """A valid row whose video lives next to the JSONL (relative path)."""
    os.makedirs(tmp_path / "videos", exist_ok=True)
    src = os.path.join(demo_dir, "videos", "at_sft-0000.mp4")
    with open(src, "rb") as f, open(tmp_path / "videos" / "v.mp4", "wb") as g:
        g.write(f.read())
    return {"id": "r-1", "video": "videos/v.mp4", "query": "What is shown?", "target": "Squares.",
            "video_label": 0, "text_label": 0, "subset": "SafeQ"}


def test_good_file_loads(tmp_path, good):
    path = write_jsonl(tmp_path / "d.jsonl", [good, {**good, "id": "r-2", "video": None}, ""])
    recs = data.load_records(path)
    assert [r.id for r in recs] == ["r-1", "r-2"]
    assert recs[0].video == str(tmp_path / "videos" / "v.mp4") and recs[1].video is None
    assert recs[0].where == f"{path}:1"
    assert recs[0].to_json()["video_label"] == 0 and "where" not in recs[0].to_json()


@pytest.mark.parametrize("case,patch,needle", [
    ("missing field", {"target": None}, "missing field 'target'"),
    ("wrong type", {"query": 5}, "query must be a string"),
    ("wrong video type", {"video": 3}, "video must be a path"),
    ("label 2", {"video_label": 2}, "video_label must be 0"),
    ("label yes", {"text_label": "yes"}, "text_label must be 0"),
    ("label True", {"video_label": True}, "video_label must be 0"),
    ("label 0.5", {"text_label": 0.5}, "text_label must be 0"),
    ("unknown subset", {"subset": "XX"}, "unknown subset 'XX'"),
    ("missing video", {"video": "videos/nope.mp4"}, "video not found"),
])
def test_bad_record(tmp_path, good, case, patch, needle):
    row = {**good, **patch}
    if patch.get("target", 0) is None:
        row.pop("target")
    path = write_jsonl(tmp_path / "d.jsonl", [{**good, "id": "r-0"}, row])
    with pytest.raises(DataError) as e:
        data.load_records(path)
    msg = str(e.value)
    assert f"{path}:2" in msg and needle in msg
    if case != "missing field":
        assert "r-1" in msg  # the record id
    if case == "missing video":
        assert str(tmp_path / "videos" / "nope.mp4") in msg


def test_malformed_json_line(tmp_path, good):
    path = write_jsonl(tmp_path / "d.jsonl", [good, '{"id": "r-2", "query": '])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: malformed JSON")):
        data.load_records(path)


def test_duplicate_id(tmp_path, good):
    path = write_jsonl(tmp_path / "d.jsonl", [good, {**good, "query": "again"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: duplicate id 'r-1'")):
        data.load_records(path)


def test_missing_or_empty_data_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        data.load_records(str(tmp_path / "absent.jsonl"))
    empty = write_jsonl(tmp_path / "e.jsonl", [""])
    with pytest.raises(DataError, match="no records"):
        data.load_records(empty)
    not_list = tmp_path / "x.json"
    not_list.write_text('{"id": 1}')
    with pytest.raises(DataError, match="must hold a list"):
        data.load_records(str(not_list))
    broken = tmp_path / "y.json"
    broken.write_text('[{"id": 1},\n  {')
    with pytest.raises(DataError, match=re.escape(f"{broken}:2: malformed JSON")):
        data.load_records(str(broken))


def test_undecodable_video(tmp_path, good, llm):
    bad = tmp_path / "videos" / "garbage.mp4"
    bad.write_bytes(os.urandom(4096))
    path = write_jsonl(tmp_path / "d.jsonl", [{**good, "id": "bad-7", "video": "videos/garbage.mp4"}])
    (rec,) = data.load_records(path)  # the file exists; decoding is what fails
    with pytest.raises(DataError) as e:
        data.read_video(rec.video, rid=rec.id)
    assert "bad-7" in str(e.value) and str(bad) in str(e.value) and "cannot decode" in str(e.value)
    with pytest.raises(DataError, match="bad-7"):  # never silently replaced by another video
        data.collate(llm, [rec], structured=False, with_target=True)


# -----------------------------------------------------------------------------
# the authors' formats


def test_videollama3_conversation_format(tmp_path, good):
    rows = [{"id": "v3-1", "video": ["videos/v.mp4"],
             "conversations": [{"from": "human", "value": "<video>\nHow do I build this?"},
                               {"from": "gpt", "value": "I can't help with that."}],
             "safety_labels": {"visual": 1, "textual": 0}},
            {"video": ["videos/v.mp4"],  # no id: named by its place; labels as top-level fields
             "conversations": [{"from": "human", "value": "<video>What is it?"}, {"from": "gpt", "value": "Squares."}],
             "visual_safety_label": 0, "textual_safety_label": 1}]
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(rows))
    a, b = data.load_records(str(path))
    assert (a.id, a.query, a.target, a.video_label, a.text_label) == ("v3-1", "How do I build this?",
                                                                      "I can't help with that.", 1, 0)
    assert a.video == str(tmp_path / "videos" / "v.mp4")
    assert b.id == f"{path}[1]" and b.query == "What is it?" and (b.video_label, b.text_label) == (0, 1)
    del rows[0]["safety_labels"]  # the error names where this format keeps the labels
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=re.escape(f"{path}[0]: missing field 'video_label' (safety_labels.visual or "
                                                  "visual_safety_label)")):
        data.load_records(str(path))


def test_grpo_format(tmp_path, good):
    sol = "<think>x</think><answer>I can't help.</answer><vidType> 1 </vidType><textType>0</textType>"
    rows = [{"problem_id": 12, "path": "videos/v.mp4", "problem": "Is this safe?", "solution": sol}]
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps(rows))
    (r,) = data.load_records(str(path))
    assert (r.id, r.query, r.target, r.video_label, r.text_label) == ("12", "Is this safe?", sol, 1, 0)
    assert r.video == str(tmp_path / "videos" / "v.mp4")
    rows[0]["solution"] = "<answer>no tags</answer>"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=re.escape(f"{path}[0]: missing field 'video_label' (<vidType> in solution)")):
        data.load_records(str(path))


def test_conversations_with_image_and_several_turns(tmp_path, good):
    """The authors' mix as it is: an "image" conversation is an image record; a multi-turn one keeps every turn."""
    os.makedirs(tmp_path / "coco", exist_ok=True)
    write_png(tmp_path / "coco" / "a.png", 32, 32)
    turns = [{"from": "human", "value": "<image>\nWhat is on the table?"}, {"from": "gpt", "value": "A cup."},
             {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Blue."}]
    rows = [{"id": "llava-1", "image": "coco/a.png", "conversations": turns,
             "safety_labels": {"visual": 0, "textual": 0}},
            {"id": "llava-2", "image": ["coco/a.png", "coco/a.png"], "conversations": [
                {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "Same."}],
             "safety_labels": {"visual": 0, "textual": 0}}]
    path = write_jsonl(tmp_path / "mix.jsonl", rows)  # the authors' build_at_sft_mix.py writes JSONL
    a, b = data.load_records(path)
    assert (a.video, a.image, a.query, a.target) == (None, [str(tmp_path / "coco" / "a.png")], "What is on the table?",
                                                     "A cup.")
    assert a.turns == [["What colour is it?", "Blue."]] and "<image>" not in a.query
    assert b.image == [str(tmp_path / "coco" / "a.png")] * 2 and b.query == "Compare and ." and b.turns is None
    assert data.load_records(write_jsonl(tmp_path / "again.jsonl", [a.to_json()]))[0].turns == a.turns  # round trip


def test_prompt_only_refuses_multi_turn_when_read(tmp_path, good):
    """GRPO and eval read prompts: a multi-turn record fails when the data are read (before any model loads), with
    its line and id, or is skipped and counted; training data (SFT) keeps it."""
    path = write_jsonl(tmp_path / "p.jsonl", [good, {**good, "id": "mt", "turns": [["And then?", "Nothing."]]}])
    assert data.load_records(path)[1].turns == [["And then?", "Nothing."]]
    with pytest.raises(DataError, match=r"p.jsonl:2 \(id mt\): a multi-turn conversation is training data"):
        data.load_records(path, prompt_only=True)
    skipped = {}
    assert [r.id for r in data.load_records(path, prompt_only=True, skip_bad=True, skipped=skipped)] == ["r-1"]
    assert list(skipped) == [f"{path}:2 (id mt)"]


@pytest.mark.parametrize("patch,needle", [
    ({"image": None}, "the first turn has 1 <image> tags for 0 image file"),  # text-only with a literal <image>
    ({"conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "<image>x"},
                        {"from": "gpt", "value": "y"}]}, "conversations[0] is from 'gpt' where a 'human'"),
    ({"conversations": [{"from": "human", "value": "<image>x"}]}, "must end with a gpt answer"),
    ({"conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"},
                        {"from": "human", "value": "<image>z"}, {"from": "gpt", "value": "w"}]},
     "<image> after the first human turn"),
    ({"image": "coco"}, "is a directory"),
    ({"image": "coco/nope.png"}, "image not found"),
    ({"video": ["videos/v.mp4"]}, "a video or images, not both"),
])
def test_bad_conversation_or_image(tmp_path, good, patch, needle):
    os.makedirs(tmp_path / "coco", exist_ok=True)
    write_png(tmp_path / "coco" / "a.png", 32, 32)
    row = {"id": "c-1", "image": "coco/a.png", "safety_labels": {"visual": 0, "textual": 0},
           "conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A cup."}], **patch}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError) as e:
        data.load_records(path)
    assert f"{path}:1" in str(e.value) and "c-1" in str(e.value) and needle in str(e.value), str(e.value)


def test_unreadable_image_named_or_skipped(tmp_path, llm, image_files):
    bad = tmp_path / "broken.png"
    bad.write_bytes(os.urandom(2048))
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "ok", "image": image_files[0], "query": "q", "target": "t", "video_label": 0, "text_label": 0},
        {"id": "bad-img", "image": ["broken.png"], "query": "q", "target": "t", "video_label": 0, "text_label": 0}])
    records = data.load_records(path)  # the file exists; decoding is what fails
    with pytest.raises(DataError) as e:
        data.collate(llm, records, structured=False, with_target=True)
    assert "bad-img" in str(e.value) and str(bad) in str(e.value) and "cannot decode image" in str(e.value)
    skipped = {}
    batch = data.collate(llm, records, structured=False, with_target=True, skip_bad=True, skipped=skipped)
    assert [r.id for r in batch["records"]] == ["ok"] and len(batch["image_grid_thw"]) == 1  # never replaced
    assert "broken.png" in " ".join(skipped.values())
