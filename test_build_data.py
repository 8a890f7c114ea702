"""Tests of build_data.py, on a folder of small clips written with PyAV: red squares (harmful), green (safe), blue
(one the labeller cannot place), one static clip, one file that is no video.

- the static filter: the clip score is VBench's count rule; DINOv2 motion is 1 - cos of the CLS features (against a
  direct computation with a tiny DINOv2 built from its config); pixel motion against hand-computed frames; the static
  clip is removed and every moving one kept, with every score in the report;
- labels from a CSV; bad rows stop with file:line; a bad video is named and skipped (or stops the run);
- the splits: disjoint by video, every file loads with data.load_records, eval balanced, targets checked;
- an API labeller and teacher over real HTTP (conftest.FakeAPI on 127.0.0.1) that decide from the frames they are
  sent; unreadable replies retried, then counted, never guessed; an interrupted run resumes without asking twice;
- hf: labeller and teacher through model.py on the tiny model; shard + merge = one run; determinism;
- end to end: build_data.py -> at_sft.py -> cold_start.py -> grpo.py -> eval.py on what it wrote.
"""

import base64
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import at_sft
import build_data as B
import cold_start
import data as D
import eval as ev
import grpo
import model as M
import rewards as R
from chat_api import APIError
from conftest import FakeAPI

RED, GREEN, BLUE = (220, 30, 30), (40, 200, 70), (40, 60, 230)
SIZE = 56  # decord cannot read the smallest clips (48x32); 56x56 like the demo's


def write_clip(path, colour, *, moving: bool, seed: int, seconds=4, fps=4):
    """A clip of `seconds` seconds, one scene per second: a 24-pixel square of `colour` on a dark background, at a
    new random place every second (moving) or always at the same place (static: identical frames)."""
    import av

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for _ in range(seconds):
            frame = np.full((SIZE, SIZE, 3), 40, np.uint8)
            y, x = rng.integers(0, SIZE - 24, 2) if moving else (16, 16)
            frame[y:y + 24, x:x + 24] = colour
            for _ in range(fps):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for i in range(4):
        write_clip(root / f"harm{i}.mp4", RED, moving=True, seed=i)
        write_clip(root / "sub" / f"safe{i}.mkv", GREEN, moving=True, seed=10 + i)
    write_clip(root / "odd.mp4", BLUE, moving=True, seed=20)
    write_clip(root / "still.mp4", RED, moving=False, seed=0)
    (root / "broken.mp4").write_bytes(b"not a video at all" * 50)
    (root / "notes.txt").write_text("not a video, not collected")
    return root


@pytest.fixture(scope="module")
def labels_csv(clips):
    rows = ["video,video_label,category,subcategory,description"]
    rows += [f"harm{i}.mp4,1,violence,graphic_violence," for i in range(4)]  # a harmful video needs no description
    rows += [f"sub/safe{i}.mkv,0,,,a blue square drifts" for i in range(4)]
    rows += ["still.mp4,1,Violence,Weapons,", "gone.mp4,0,,,"]  # names as a person types them; a video since deleted
    path = clips.parent / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory):
    """A tiny DINOv2 from its config, saved and loaded by path like facebook/dinov2-small. A wide initialisation
    (std 1.0): at the default 0.02 a random ViT's CLS output hardly depends on the image (cosine 0.998 between
    different frames), unlike a trained one's."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
                       patch_size=14, initializer_range=1.0)
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(cfg).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return str(path)


def build(videos, out, *extra, dinov2=None):
    flags = ["--static-model", dinov2] if dinov2 else ["--static-filter", "pixels"]
    return B.main(["--videos", str(videos), "--out", str(out), "--device", "cpu", *flags, *extra])


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def fates(report):
    return {f["video"]: f for f in report["videos"]}


# -----------------------------------------------------------------------------
# 2. the static filter


def test_clip_score_is_vbench_count_rule():
    m = np.array([0.3, 0.01, 0.2, 0.0])  # 5 frames: k = round(10/16) = 1, so the 2nd largest motion
    assert B.clip_score(m, 5) == 0.2 and B.clip_score(np.array([]), 1) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(300):  # score <= τ  <=>  at most round(2T/16) pairs move more than τ
        T = int(rng.integers(2, 120))
        motion, tau = rng.random(T - 1) ** 3, float(rng.random() * 0.3)
        assert (B.clip_score(motion, T) <= tau) == (int((motion > tau).sum()) <= round(2 * T / 16))


def test_motion_dinov2_and_pixels(tiny_dinov2, clips):
    from transformers import AutoImageProcessor, Dinov2Model

    scorer = B.MotionScorer("dinov2", tiny_dinov2, "cpu", 1.0, 90)
    frames, _ = D.read_video(str(clips / "harm0.mp4"))  # (4, 56, 56, 3) at 1 fps
    model, proc = Dinov2Model.from_pretrained(tiny_dinov2).eval(), AutoImageProcessor.from_pretrained(tiny_dinov2)
    with torch.no_grad():
        cls = model(**proc(images=list(frames), return_tensors="pt")).last_hidden_state[:, 0]  # (4, 32)
    expect = 1 - torch.nn.functional.cosine_similarity(cls[1:], cls[:-1], dim=-1)
    assert np.allclose(scorer.motion(frames), expect.numpy(), atol=1e-5)
    assert scorer.score(frames) > B.THRESHOLDS["dinov2"]
    still, _ = D.read_video(str(clips / "still.mp4"))
    assert scorer.motion(still).max() < 1e-3 and scorer.score(still) <= B.THRESHOLDS["dinov2"]

    black, white = np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8)
    half = black.copy()
    half[:32] = 255
    pixels = B.MotionScorer("pixels", "", "cpu", 1.0, 90)
    assert np.allclose(pixels.motion(np.stack([black, white, half])), [1.0, 0.5], atol=1e-6)  # mean |Δ grey|
    assert B.MotionScorer("none", "", "cpu", 1.0, 90).score(frames) is None


# -----------------------------------------------------------------------------
# 1, 3, 7: a run on the clips with the labels CSV


@pytest.fixture(scope="module")
def csv_run(clips, labels_csv, tiny_dinov2, tmp_path_factory):
    out = tmp_path_factory.mktemp("csv_run")
    report = build(clips, out, "--labels", labels_csv, "--split", "1,1,1,1", "--skip-bad-records", "--safe-queries",
                   "2", dinov2=tiny_dinov2)
    return out, report


def test_static_removed_moving_kept_bad_named(csv_run, clips, labels_csv, tiny_dinov2, tmp_path):
    out, report = csv_run
    f = fates(report)
    assert "notes.txt" not in f and len(f) == 11  # 10 videos, the .mkv in sub/ found
    assert f["still.mp4"]["fate"] == "static" and f["still.mp4"]["static_score"] <= 0.05
    moving = [k for k in f if k.startswith(("harm", "sub/", "odd"))]
    assert all(f[k]["static_score"] > 0.05 and f[k]["fate"] != "static" for k in moving)
    assert f["broken.mp4"]["fate"] == "bad" and "cannot decode" in f["broken.mp4"]["why"]
    assert str(clips / "broken.mp4") in f["broken.mp4"]["why"]
    assert f["odd.mp4"]["fate"] == "unlabelled" and "no row in the labels CSV" in f["odd.mp4"]["why"]
    assert report["dropped"] == {"bad_videos": 1, "static_videos": 1, "unlabelled_videos": 1,
                                 "pairs_without_target": 0, "records_cut_for_eval_balance": 3,
                                 "csv_rows_without_video": 1}
    assert report["csv_rows_without_video"] == ["gone.mp4"]  # the row itself named, not only counted
    md = (out / "build_report.md").read_text()
    assert all(k in md for k in f) and f"{f['still.mp4']['static_score']:.4f}" in md
    assert "--labels rows naming no collected video: gone.mp4" in md

    with pytest.raises(D.DataError, match=r"video broken\.mp4: cannot decode video .*broken\.mp4.*--skip-bad-records"):
        build(clips, tmp_path / "stop", "--labels", labels_csv, dinov2=tiny_dinov2)


def test_splits_disjoint_by_video_and_every_split_loads(csv_run, clips):
    out, report = csv_run
    videos = {}
    for split in B.SPLITS:
        records = D.load_records(str(out / f"{split}.jsonl"))  # as every stage reads them
        videos[split] = {r.video for r in records}
        assert records and all(os.path.isfile(r.video) for r in records)
        for r in records:
            assert (r.video_label, r.text_label) == {"HH": (1, 1), "SH": (0, 1)}.get(r.subset, (r.video_label, 0))
            if split == "at_sft":  # plain answers
                assert "<think>" not in r.target and r.target
            else:
                assert R.format_reward(r.target) == 1.0
                tags = R.parse_structured(r.target)
                assert (tags["vidType"], tags["textType"]) == (str(r.video_label), str(r.text_label))
            if r.subset == "HH":
                assert (r.category, r.subcategory) == ("violence", "graphic_violence")  # the CSV's label
    for a in B.SPLITS:
        for b in B.SPLITS:
            assert a == b or not videos[a] & videos[b], (a, b)
    assert sum(map(len, videos.values())) == 8  # every kept video in exactly one split, 1 harmful + 1 safe each
    subsets = [r.subset for r in D.load_records(str(out / "eval.jsonl"))]
    assert subsets.count("HH") == subsets.count("SH") == subsets.count("SafeQ") == 1  # balanced (4 SafeQ cut to 1)
    assert report["counts"]["records"]["at_sft"] == {"total": 6, "HH": 1, "SH": 1, "SafeQ": 4}


def test_an_empty_split_is_said_in_the_output_and_the_report(clips, labels_csv, tmp_path, capsys):
    """Too few videos for a split's weight: the file is written empty, and the user is told before a stage fails on
    it; a split weighted 0 on purpose is not a warning."""
    report = build(clips, tmp_path / "o", "--labels", labels_csv, "--split", "1,1000,1000,0", "--skip-bad-records")
    assert report["empty_splits"] == ["at_sft"]  # eval is empty too, but by its weight 0
    assert rows(tmp_path / "o" / "at_sft.jsonl") == [] and rows(tmp_path / "o" / "eval.jsonl") == []
    said = capsys.readouterr().out
    assert "warning: at_sft.jsonl got no record" in said and "eval.jsonl got" not in said
    assert "**Empty:** at_sft got no record" in (tmp_path / "o" / "build_report.md").read_text(encoding="utf-8")


def test_a_safe_video_without_description_has_no_offline_answer(clips, labels_csv, tmp_path, capsys):
    """The template teacher cannot answer "Describe what happens in this video" without the video's description: those
    pairs are left out, counted, named in the report and said in the output, never answered with a placeholder."""
    csv = tmp_path / "no_description.csv"
    csv.write_text(open(labels_csv).read().replace(",a blue square drifts", ","))
    report = build(clips, tmp_path / "o", "--labels", str(csv), "--skip-bad-records", "--safe-queries", "2")
    safe = [f for k, f in fates(report).items() if k.startswith("sub/")]
    assert len(safe) == 4 and all(len(f["dropped_pairs"]) == 2 and "has none" in f["why"] for f in safe)
    assert all(d["id"].split("-")[-1].startswith("safeq") for f in safe for d in f["dropped_pairs"])
    assert report["dropped"]["pairs_without_target"] == 8
    written = [r for s in B.SPLITS for r in rows(tmp_path / "o" / f"{s}.jsonl")]
    assert {r["subset"] for r in written if not r["video_label"]} == {"SH"}  # its harmful requests are still refused
    assert "2 of 3 pairs without a usable target, e.g. template target: a safe request" in (
        tmp_path / "o" / "build_report.md").read_text()
    assert "warning: 8 video-query pairs have no usable target" in capsys.readouterr().out


def test_labels_csv_errors(tmp_path):
    tax = B.load_taxonomy(None)
    cases = {"video_label must be 0 .* got '2'": "a.mp4,1,violence,weapons\nb.mp4,2,,",
             "not in the taxonomy; pass --taxonomy": "a.mp4,1,violence,cooking",
             "a second row for this video": "b.mp4,0,,\nb.mp4,1,violence,weapons"}
    for i, (msg, body) in enumerate(cases.items()):
        path = tmp_path / f"l{i}.csv"
        path.write_text("video,video_label,category,subcategory\n" + body + "\n")
        with pytest.raises(D.DataError, match=f"l{i}.csv:[23] .*{msg}"):
            B.read_labels_csv(str(path), tax)
    (tmp_path / "cols.csv").write_text("video,label\na.mp4,1\n")
    with pytest.raises(D.DataError, match="missing column"):
        B.read_labels_csv(str(tmp_path / "cols.csv"), tax)
    (tmp_path / "latin.csv").write_bytes("video,video_label,category,subcategory,description\n"
                                         "a.mp4,0,,,un caf\u00e9\n".encode("latin-1"))  # as a spreadsheet saves it
    with pytest.raises(D.DataError, match="latin.csv: not UTF-8"):
        B.read_labels_csv(str(tmp_path / "latin.csv"), tax)


# -----------------------------------------------------------------------------
# 3, 6: an API labeller and teacher over real HTTP, deciding from the frames they receive


def frame_colours(body):
    """The request's image parts, decoded: the colour of the square in each frame (red / green / blue)."""
    from PIL import Image

    parts = [p for p in body["messages"][0]["content"] if p["type"] == "image_url"]
    colours = []
    for p in parts:
        url = p["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")).astype(int)
        assert img.shape == (SIZE, SIZE, 3)  # --image-size 448 never enlarges
        r, g, b = (img[..., c].max() for c in range(3))
        colours.append("red" if r > 150 > g else "green" if g > 150 > r else "blue" if b > 150 > r else "?")
    return colours


def fake_vlm(body):
    """What a vision model would answer: a label from the frames' colour (blue: a category outside the taxonomy,
    every time), or for the teacher a structured answer with the labels it was told, except for SafeQ on a harmful
    video, where it always writes the wrong <vidType>."""
    text = body["messages"][0]["content"][0]["text"]
    colours = set(frame_colours(body))
    if text.startswith("You write reference answers"):
        v, t = re.search(r"<vidType>(\d)</vidType><textType>(\d)</textType>", text).groups()
        v = "0" if (v, t) == ("1", "0") else v
        return f"<think>I look at the frames.</think><answer>Teacher answer.</answer><vidType>{v}</vidType>" \
               f"<textType>{t}</textType>"
    label = {"red": '{"harmful": true, "category": "violence", "subcategory": "graphic_violence", "description": '
                    '"a red square <b>jumps</b> around."}',
             "green": '{"harmful": false, "category": "", "subcategory": "", "description": "A green square moves"}',
             "blue": '{"harmful": true, "category": "aliens", "subcategory": "ufo", "description": "blue"}'}
    return "Sure! " + label[colours.pop()] if len(colours) == 1 else "I cannot tell"


def video_of(body):
    """The video a request is about, told apart by its first frame."""
    parts = [p for p in body["messages"][0]["content"] if p["type"] == "image_url"]
    return hashlib.sha1(parts[0]["image_url"]["url"].encode()).hexdigest()


API = ["--labeler", "openai", "--teacher", "openai", "--labeler-key-env", "VSR1_TEST_KEY", "--teacher-key-env",
       "VSR1_TEST_KEY", "--labeler-model", "vlm-test", "--teacher-model", "vlm-test", "--label-frames", "3",
       "--labeler-retries", "0", "--teacher-retries", "0", "--api-backoff", "0", "--skip-bad-records"]


def test_api_labeller_and_teacher_over_http_and_resume(clips, api_key, tmp_path):
    out = tmp_path / "api"
    api = FakeAPI([("call", fake_vlm)] * 200)
    B.api_frames.cache_clear()
    try:
        report = build(clips, out, *API, "--labeler-url", api.url, "--teacher-url", api.url, "--split", "1,1,1,1",
                       "--api-workers", "4")
        reqs = list(api.requests)
        decoded = B.api_frames.cache_info().misses  # a clip's frames made once for its requests (9 clips were asked
        assert 9 <= decoded < len(reqs) / 3  # about; two workers may both make one clip's at the same moment)
        assert all(r["path"] == "/v1/chat/completions" and r["auth"] == f"Bearer {api_key}" for r in reqs)
        assert all(r["body"]["model"] == "vlm-test" for r in reqs)
        assert all(len(frame_colours(r["body"])) == 3 for r in reqs)  # --label-frames 3 of the 4 frames, as images
        labels = [r for r in reqs if not r["body"]["messages"][0]["content"][0]["text"].startswith("You write")]
        assert len(labels) == 4 + 4 + 3  # one per labelled video; the blue one asked 3 times, then skipped
        assert [r["body"]["temperature"] for r in labels if frame_colours(r["body"])[0] == "blue"] == [0, 0.7, 0.7]
        f = fates(report)
        assert all(f[f"harm{i}.mp4"]["label"]["video_label"] == 1 for i in range(4))  # decided from red frames
        assert all(f[f"sub/safe{i}.mkv"]["label"]["video_label"] == 0 for i in range(4))  # and from green ones
        assert f["harm0.mp4"]["label"]["description"] == "a red square b jumps /b around"  # no tag can leak
        assert f["odd.mp4"]["fate"] == "unlabelled" and "3 replies, none usable" in f["odd.mp4"]["why"]
        assert "not in the taxonomy" in f["odd.mp4"]["why"]
        assert f["still.mp4"]["fate"] == "static" and f["broken.mp4"]["fate"] == "bad"  # never sent to the labeller
        assert report["dropped"]["pairs_without_target"] == 4  # SafeQ of the 4 harmful videos: wrong <vidType> x3
        assert all("labels 0/0, the record's are 1/0" in d["why"] for k in f for d in f[k].get("dropped_pairs", []))
        targets = {r["target"] for s in B.SPLITS for r in rows(out / f"{s}.jsonl")}
        assert targets == {"Teacher answer.", "<think>I look at the frames.</think><answer>Teacher answer.</answer>"
                           "<vidType>1</vidType><textType>1</textType>", "<think>I look at the frames.</think><answer>"
                           "Teacher answer.</answer><vidType>0</vidType><textType>1</textType>",
                           "<think>I look at the frames.</think><answer>Teacher answer.</answer><vidType>0</vidType>"
                           "<textType>0</textType>"}
        files = {s: (out / f"{s}.jsonl").read_text() for s in B.SPLITS}

        build(clips, out, *API, "--labeler-url", api.url, "--teacher-url", api.url, "--split", "1,1,1,1")
        assert len(api.requests) == len(reqs)  # the rerun asked nothing
        assert files == {s: (out / f"{s}.jsonl").read_text() for s in B.SPLITS}
    finally:
        api.close()

    # interrupted: the server fails after 4 answers (the labels of harm0-3; HTTP 400 stops the run), then a rerun
    # finishes the job
    out2 = tmp_path / "interrupted"
    api = FakeAPI([("call", fake_vlm)] * 4 + [("status", 400)] * 50)
    try:
        with pytest.raises(APIError, match="HTTP 400"):
            build(clips, out2, *API, "--labeler-url", api.url, "--teacher-url", api.url, "--api-workers", "1")
        answered = {video_of(r["body"]) + r["body"]["messages"][0]["content"][0]["text"] for r in api.requests[:4]}
    finally:
        api.close()
    api = FakeAPI([("call", fake_vlm)] * 200)
    try:
        build(clips, out2, *API, "--labeler-url", api.url, "--teacher-url", api.url, "--split", "1,1,1,1")
        again = [video_of(r["body"]) + r["body"]["messages"][0]["content"][0]["text"] for r in api.requests]
        assert not answered & set(again) and len(again) == len(reqs) - 4  # nothing answered before was asked again
        assert files == {s: (out2 / f"{s}.jsonl").read_text() for s in B.SPLITS}
    finally:
        api.close()


# -----------------------------------------------------------------------------
# hf: labeller and teacher through model.py; shards; determinism


def test_hf_labeller_and_teacher_through_model_py(clips, tmp_path, monkeypatch):
    listing = tmp_path / "list.txt"  # a list file instead of a folder, paths relative to it
    listing.write_text("\n".join(os.path.relpath(clips / n, tmp_path) for n in
                                 ("harm0.mp4", "harm1.mp4", "sub/safe0.mkv", "sub/safe1.mkv")) + "\n")
    hf = ["--labeler", "hf:tiny-videollama3", "--teacher", "hf:tiny-videollama3", "--static-filter", "none",
          "--labeler-max-tokens", "4", "--teacher-max-tokens", "4", "--label-attempts", "2", "--target-attempts", "2",
          "--split", "1,0,0,1"]
    with pytest.raises(D.DataError, match="no video gave a record"):  # the untrained tiny model's replies: never used
        B.main(["--videos", str(listing), "--out", str(tmp_path / "raw"), "--device", "cpu", *hf])
    report = json.loads((tmp_path / "raw" / "build_report.json").read_text())
    assert report["counts"]["videos"] == {"collected": 4, "unlabelled": 4}
    assert all("2 replies, none usable" in f["why"] for f in report["videos"])

    real_generate, real_load, seen, loads = M.generate, M.load_model, [], []

    def scripted(llm, batch, **kw):  # the real model runs on the real batch; its words are replaced by a script
        real_generate(llm, batch, **kw)
        seen.append(batch)
        out = []
        for r in batch["records"]:
            if r.query.startswith("You write reference answers"):
                v, t = re.search(r"<vidType>(\d)</vidType><textType>(\d)</textType>", r.query).groups()
                out.append(f"<think>t</think><answer>hf answer</answer><vidType>{v}</vidType><textType>{t}</textType>")
            else:
                harmful = "harm" in r.id
                out.append(json.dumps({"harmful": harmful, "category": "violence" if harmful else "",
                                       "subcategory": "weapons" if harmful else "", "description": "squares"}))
        return None, out

    monkeypatch.setattr(M, "generate", scripted)
    monkeypatch.setattr(M, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    report = B.main(["--videos", str(listing), "--out", str(tmp_path / "hf"), "--device", "cpu", *hf])
    assert len(loads) == 1  # one model, labeller and teacher
    assert all("pixel_values_videos" in b and b["input_ids"].shape[0] <= 4 for b in seen)  # the videos went in
    assert report["counts"]["videos"] == {"collected": 4, "kept": 4}
    assert {f["label"]["source"] for f in report["videos"]} == {"hf:tiny-videollama3"}
    eval_rows = rows(tmp_path / "hf" / "eval.jsonl")
    assert eval_rows and all("hf answer" in r["target"] for r in eval_rows)


def test_shards_then_merge_equal_one_run_and_seed(clips, labels_csv, tmp_path):
    flags = ["--labels", labels_csv, "--skip-bad-records", "--split", "1,1,1,1"]
    one = build(clips, tmp_path / "one", *flags)
    build(clips, tmp_path / "sharded", *flags, "--shard", "0", "--num-shards", "2")
    with pytest.raises(D.DataError, match="no cached result for these flags.*before --merge"):
        build(clips, tmp_path / "sharded", *flags, "--merge")  # shard 1 has not run
    build(clips, tmp_path / "sharded", *flags, "--shard", "1", "--num-shards", "2")
    merged = build(clips, tmp_path / "sharded", *flags, "--merge")
    for s in B.SPLITS:
        assert (tmp_path / "one" / f"{s}.jsonl").read_bytes() == (tmp_path / "sharded" / f"{s}.jsonl").read_bytes()
    assert one["videos"] == merged["videos"] and one["counts"] == merged["counts"]

    other = build(clips, tmp_path / "seed1", *flags, "--seed", "1")  # another seed: other queries / languages / split
    assert [f["fate"] for f in other["videos"]] == [f["fate"] for f in one["videos"]]
    assert any((tmp_path / "one" / f"{s}.jsonl").read_text() != (tmp_path / "seed1" / f"{s}.jsonl").read_text()
               for s in B.SPLITS)


def test_one_run_per_out_and_per_shard(clips, labels_csv, tmp_path):
    """A second build into a folder a live run holds stops before any work (no cache, no file); shards of one build
    lock only their own share; every lock is gone when the run ends."""
    from outdir import LOCK_FILE, OutputBusy

    flags, out = ["--labels", labels_csv, "--skip-bad-records", "--split", "1,1,1,1"], tmp_path / "o"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (LOCK_FILE, f"{LOCK_FILE}-shard-1-of-2"):
            (out / name).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        with pytest.raises(OutputBusy, match=f"in use by another run \\(pid {sleeper.pid}"):
            build(clips, out, *flags)
        assert sorted(os.listdir(out)) == sorted([LOCK_FILE, f"{LOCK_FILE}-shard-1-of-2"])  # nothing done
        with pytest.raises(OutputBusy):
            build(clips, out, *flags, "--shard", "1", "--num-shards", "2")
        assert build(clips, out, *flags, "--shard", "0", "--num-shards", "2")["shard"] == 0  # its own share: free
    finally:
        sleeper.kill()
        sleeper.wait()
    build(clips, out, *flags, "--shard", "1", "--num-shards", "2")  # the holder is gone: its stale locks are taken
    build(clips, out, *flags, "--merge")
    assert not [n for n in os.listdir(out) if n.startswith(LOCK_FILE)]


@pytest.mark.distributed
def test_torchrun_ranks_are_shards_and_rank0_merges(clips, labels_csv, tmp_path):
    flags = ["--labels", labels_csv, "--skip-bad-records", "--split", "1,1,1,1", "--static-filter", "pixels"]
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), B.__file__, "--videos", str(clips), "--out", str(tmp_path / "ranks"), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "shard 1 of 2 done" in r.stdout and "rank 0 writes the splits" in r.stdout
    B.main(["--videos", str(clips), "--out", str(tmp_path / "one"), *flags])
    for s in B.SPLITS:
        assert (tmp_path / "one" / f"{s}.jsonl").read_bytes() == (tmp_path / "ranks" / f"{s}.jsonl").read_bytes()


# -----------------------------------------------------------------------------
# the end-to-end proof: build_data.py -> at_sft.py -> cold_start.py -> grpo.py -> eval.py


def test_end_to_end_build_then_every_stage(clips, tiny_dinov2, api_key, tmp_path):
    data = tmp_path / "data"
    api = FakeAPI([("call", fake_vlm)] * 100)
    try:
        build(clips, data, "--labeler", "openai", "--labeler-url", api.url, "--labeler-key-env", "VSR1_TEST_KEY",
              "--skip-bad-records", "--split", "1,1,1,1", dinov2=tiny_dinov2)  # template targets
    finally:
        api.close()
    sft = ["--batch-size", "2", "--grad-accum", "1", "--max-steps", "1", "--eval-data", str(data / "eval.jsonl"),
           "--eval-records", "2", "--device", "cpu"]
    s1 = at_sft.main(["--data", str(data / "at_sft.jsonl"), "--out", str(tmp_path / "at_sft"), *sft])
    s2 = cold_start.main(["--model", str(tmp_path / "at_sft"), "--data", str(data / "cold_start.jsonl"),
                          "--out", str(tmp_path / "cold_start"), *sft])
    s3 = grpo.main(["--model", str(tmp_path / "cold_start"), "--data", str(data / "grpo.jsonl"), "--out",
                    str(tmp_path / "grpo"), "--batch-size", "2", "--group-size", "2", "--max-completion-length", "6",
                    "--max-steps", "1", "--device", "cpu", "--eval-data", str(data / "eval.jsonl"), "--eval-records", "2"])
    assert (s1["stage"], s1["step"], s2["stage"], s2["step"], s3["stage"], s3["steps"]) == (
        "at_sft", 1, "cold_start", 1, "grpo", 1)
    assert "heldout_atc_v_acc" in s1 and "heldout_format_rate" in s2
    for s in (s1, s2, s3):  # every stage fits the heads' thresholds on its held-out split, and they travel
        assert {"threshold_v", "threshold_t", "heldout_atc_v_acc_fit", "heldout_atc_t_auroc"} <= set(s), s["stage"]
    saved = M.load_model(str(tmp_path / "grpo"), device="cpu").alarm
    assert (saved.thresholds, saved.threshold_notes["v"][:5]) == ({"v": s3["threshold_v"], "t": s3["threshold_t"]}, "grpo:")
    ev.main(["--model", str(tmp_path / "grpo"), "--data", str(data / "eval.jsonl"), "--out", str(tmp_path / "eval"),
             "--max-new-tokens", "4", "--device", "cpu"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    n_eval = len(rows(data / "eval.jsonl"))
    assert metrics["n"] == n_eval == 3 and metrics["dsr_hh"] is not None and metrics["format_rate"] is not None
