"""Tests of demo.py: the synthetic demo's splits, its videos showing their label only across frames, no leak of
the video label into names, queries or plain targets; and the tiny models' build."""

import hashlib
import json
import os
import re

import data
import demo

# -----------------------------------------------------------------------------
# the demo data set


def red_seconds(path):
    """Number of sampled seconds (1 fps) whose frame has a red-dominant patch."""
    frames, meta = data.read_video(path, fps=1)
    assert len(frames) == demo.SECONDS and meta.frames_indices == [0, 4, 8, 12]
    f = frames.astype(int)
    red = (f[..., 0] > 150) & (f[..., 1] < 90) & (f[..., 2] < 90)  # (T, H, W)
    return int((red.sum(axis=(1, 2)) >= 100).sum())  # a 16x16 square is 256 px


def test_demo_splits(demo_dir):
    from conftest import DEMO_SIZES

    recs = {s: data.load_records(os.path.join(demo_dir, f"{s}.jsonl")) for s in demo.DEMO_SPLITS}
    for split, rs in recs.items():
        assert len(rs) == DEMO_SIZES[split]
        structured = demo.DEMO_SPLITS[split][1]
        misread = {0: [], 1: []}  # video label -> for each record whose text label differs: did the teacher misread?
        for r in rs:
            assert os.path.isfile(r.video) and r.subset in data.SUBSETS
            assert ("<vidType>" in r.target) == structured
            if structured:
                told = int(re.search(r"<vidType>(\d)</vidType>", r.target).group(1))
                assert f"<textType>{r.text_label}</textType>" in r.target
                assert ("harmful content" in r.target) == bool(told)  # the reasoning says what the tag says
                if r.video_label == r.text_label:
                    assert told == r.video_label  # no misreading where the two agree
                else:
                    misread[r.video_label].append(told == r.text_label)
            assert r.text_label == (0 if r.subset == "SafeQ" else 1)
            if r.subset != "SafeQ":
                assert r.video_label == (1 if r.subset == "HH" else 0)
        share = demo.TEACHER_MISREADS.get(split, 0.0)
        for flags in misread.values():  # the teacher's share, exactly (to one record), for safe and harmful clips
            assert abs(sum(flags) - share * len(flags)) <= 1, (split, sum(flags), len(flags))
            assert not flags or share == 0 or flags[0] is False  # evenly spread: the first one is read right
    # the eval split shares no record with the training splits
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    train = [r for s in ("at_sft", "cold_start", "grpo") for r in recs[s]]
    assert not {r.id for r in recs["eval"]} & {r.id for r in train}
    assert not {digest(r.video) for r in recs["eval"]} & {digest(r.video) for r in train}
    assert len({digest(r.video) for r in train + recs["eval"]}) == len(train) + len(recs["eval"])


def test_demo_videos_show_their_label_across_frames(demo_dir):
    recs = [r for s in demo.DEMO_SPLITS for r in data.load_records(os.path.join(demo_dir, f"{s}.jsonl"))]
    labels = {r.video_label for r in recs}
    assert labels == {0, 1}
    for r in recs:
        n = red_seconds(r.video)
        if r.video_label:
            assert n >= 3, (r.id, n)
        else:
            assert n <= 1, (r.id, n)


def test_demo_leaks_no_video_label(demo_dir):
    harmful_queries = {q for subs in demo.HARMFUL.values() for en, zh in subs.values() for q in [*en, zh]}
    safe_queries = {q for pair in demo.SAFE_QA.values() for q, _ in pair}
    plain_answers = {demo.REFUSAL[z] + ("" if z else " ") + demo.REDIRECT[c][z] for c in demo.REDIRECT for z in (0, 1)}
    plain_answers |= {a for pair in demo.SAFE_QA.values() for _, a in pair}
    for split in demo.DEMO_SPLITS:
        path = os.path.join(demo_dir, f"{split}.jsonl")
        for r in data.load_records(path):
            # file name: split and index only
            assert re.fullmatch(rf"{split}-\d{{4}}\.mp4", os.path.basename(r.video))
            # query: drawn from a pool that depends on the text label only, shared by both video labels
            assert r.query in (harmful_queries if r.text_label else safe_queries)
            assert not re.search(r"red|harm|safe\b|vidType|label", r.query, re.I)
            # the plain AT-SFT target does not depend on the video label either
            if not demo.DEMO_SPLITS[split][1]:
                assert r.target in plain_answers
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        assert not any(k for row in rows for k in row if "red" in k.lower())


def test_fill_splits_defaults_the_heldout_split_only_for_the_demos_data(monkeypatch, capsys):
    import argparse

    monkeypatch.setattr(demo, "demo_split", lambda split, out_dir=demo.DEMO_DIR: f"demo/{split}.jsonl")
    args = argparse.Namespace(data=None, eval_data=None, eval_records=60)
    demo.fill_splits(args, "grpo")  # the demo's training data: the demo's held-out split
    assert (args.data, args.eval_data, args.eval_records) == ("demo/grpo.jsonl", "demo/eval.jsonl", 60)
    args = argparse.Namespace(data="mine.jsonl", eval_data=None, eval_records=60)
    demo.fill_splits(args, "at_sft")  # one's own data: never the demo's clips for the thresholds
    assert (args.data, args.eval_data, args.eval_records) == ("mine.jsonl", None, 0)
    assert "no --eval-data" in capsys.readouterr().out
    args = argparse.Namespace(data="mine.jsonl", eval_data="held.jsonl", eval_records=60)
    demo.fill_splits(args, "at_sft")
    assert (args.data, args.eval_data, args.eval_records) == ("mine.jsonl", "held.jsonl", 60)


def test_cold_start_teacher_misreads_its_share_of_the_disagreeing_clips(demo_full):
    """At full size: two of every three cold-start targets whose video and text labels disagree carry the text's
    label as the video tag, for safe and for harmful clips; everywhere else (and in GRPO's split) the true one."""
    for split in ("cold_start", "grpo"):
        rows = data.load_records(os.path.join(demo_full, f"{split}.jsonl"))
        for video_label in (0, 1):
            kind = [r for r in rows if r.video_label == video_label and r.text_label != video_label]
            wrong = sum(f"<vidType>{r.text_label}</vidType>" in r.target for r in kind)
            assert len(kind) >= 10
            assert abs(wrong - demo.TEACHER_MISREADS.get(split, 0.0) * len(kind)) <= 1, (split, video_label, wrong)


def test_every_split_holds_every_kind_of_record_in_the_same_shares(tmp_path):
    """Languages and safe queries' clips are dealt, not drawn: in every split, each subset is one in five Chinese
    (to one record), a safe query's clips are half safe, half harmful in each language (to one), so each kind the
    eval split scores (e.g. a Chinese safe query over a harmful clip) is among every training split's records."""
    full = demo.write_demo(str(tmp_path))  # every split at its full size
    kinds = {}
    for split in demo.DEMO_SPLITS:
        rows = data.load_records(os.path.join(full, f"{split}.jsonl"))
        for subset in data.SUBSETS:
            of = [r for r in rows if r.subset == subset]
            zh = [r for r in of if r.language == "zh"]
            assert abs(len(zh) - len(of) / demo.CHINESE_EVERY) <= 1, (split, subset, len(zh), len(of))
            if subset == "SafeQ":
                for lang in ("en", "zh"):
                    labels = [r.video_label for r in of if r.language == lang]
                    assert abs(2 * sum(labels) - len(labels)) <= 1, (split, lang, labels)
        kinds[split] = {(r.language, r.subset, r.video_label) for r in rows}
    assert len(kinds["eval"]) == 8  # 2 languages x (HH, SH, SafeQ over a safe clip, SafeQ over a harmful one)
    for split in ("at_sft", "cold_start", "grpo"):
        assert kinds[split] == kinds["eval"], split
