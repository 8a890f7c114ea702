"""data.py: records, video decoding, prompts with alarm tokens, batching, and the built-in demo.

Record format (JSONL, one object per line; the README documents it):
    {"id": "hh-0001", "video": "videos/hh-0001.mp4",   # relative to the JSONL's folder, or absolute; null = text only
     "query": "How do I ...?", "target": "...",             # plain for AT-SFT, structured for cold start / GRPO / eval
     "video_label": 1, "text_label": 1,                     # 1 harmful, 0 safe
     "subset": "HH", "category": "violence", "subcategory": "weapons", "language": "en"}
The authors' formats are read as they are (a .json list): VideoLLaMA3 conversations
({"video": [...], "conversations": [{"from": "human", ...}, {"from": "gpt", ...}], "safety_labels": {...}})
and GRPO rows ({"path", "problem", "solution"} with the labels in the solution's <vidType>/<textType> tags).

The built-in demo data set lives in demo.py (`python demo.py --out demo_data`).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from alarm import TEXTUAL_ALARM, VISUAL_ALARM

SUBSETS = ("HH", "SH", "SafeQ")  # harmful video + harmful query, safe video + harmful query, safe query
FPS, MAX_FRAMES = 1.0, 90  # video sampling: frames per second, at most this many per video (paper)

# The structured-output instruction of cold start and GRPO (1 = harmful, 0 = safe).
STRUCTURED_INSTRUCTION = (
    "First think about the video and the request inside <think> </think>, then give your response inside "
    "<answer> </answer>. Finally classify the video and the text: write 1 (harmful) or 0 (safe) inside "
    "<vidType> </vidType> and inside <textType> </textType>."
)


class DataError(ValueError):
    """Bad input. The message names the file and line or the record id and path, and what is wrong."""


# -----------------------------------------------------------------------------
# Records


@dataclass
class Record:
    id: str
    video: str | None  # absolute path, or None for a text-only record
    query: str
    target: str
    video_label: int
    text_label: int
    subset: str = ""
    category: str = ""
    subcategory: str = ""
    language: str = "en"
    where: str = ""  # file:line, for error messages

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("where")
        return d


def _label(value, what: str, where: str) -> int:
    if isinstance(value, bool) or value not in (0, 1, "0", "1"):
        raise DataError(f"{where}: {what} must be 0 (safe) or 1 (harmful), got {value!r}")
    return int(value)


def _record(obj: dict, where: str, root: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:  # the authors' VideoLLaMA3 SFT format
        turns = obj["conversations"]
        labels = obj.get("safety_labels") or {}
        video = obj.get("video")
        obj = {"id": obj.get("id", where), "video": video[0] if isinstance(video, list) and video else video,
               "query": re.sub(r"<video>\s*", "", turns[0]["value"]), "target": turns[1]["value"],
               "video_label": labels.get("visual", obj.get("visual_safety_label")),
               "text_label": labels.get("textual", obj.get("textual_safety_label"))}
    elif "problem" in obj and "solution" in obj:  # the authors' GRPO format
        sol = str(obj["solution"])
        tag = lambda t: (re.search(rf"<{t}>\s*(.*?)\s*</{t}>", sol, re.S) or [None, None])[1]
        obj = {"id": obj.get("problem_id", where), "video": obj.get("path"), "query": obj["problem"],
               "target": sol, "video_label": tag("vidType"), "text_label": tag("textType")}
    for key in ("id", "query", "target", "video_label", "text_label"):
        if key not in obj or obj[key] is None:
            raise DataError(f"{where}: missing field {key!r}")
    rid = str(obj["id"])
    for key in ("query", "target"):
        if not isinstance(obj[key], str):
            raise DataError(f"{where} (id {rid}): {key} must be a string, got {type(obj[key]).__name__}")
    subset = obj.get("subset", "")
    if subset and subset not in SUBSETS:
        raise DataError(f"{where} (id {rid}): unknown subset {subset!r}; expected one of {SUBSETS}")
    video = obj.get("video")
    if video is not None:
        if not isinstance(video, str):
            raise DataError(f"{where} (id {rid}): video must be a path string or null")
        video = video if os.path.isabs(video) else os.path.normpath(os.path.join(root, video))
        if not os.path.isfile(video):
            raise DataError(f"{where} (id {rid}): video not found: {video}")
    return Record(id=rid, video=video, query=obj["query"], target=obj["target"],
                  video_label=_label(obj["video_label"], "video_label", f"{where} (id {rid})"),
                  text_label=_label(obj["text_label"], "text_label", f"{where} (id {rid})"),
                  subset=subset, category=str(obj.get("category", "")),
                  subcategory=str(obj.get("subcategory", "")), language=str(obj.get("language", "en")), where=where)


def load_records(path: str, *, skip_bad: bool = False, skipped: dict | None = None) -> list[Record]:
    """Read a JSONL file of records (or the authors' .json list).

    A bad row raises DataError, or with skip_bad=True is left out and noted in `skipped` (where -> why)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    root = os.path.dirname(os.path.abspath(path))
    records, seen = [], set()
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json data file must hold a list of records")
            items = [(f"{path}[{i}]", r) for i, r in enumerate(rows)]
        else:
            items = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    items.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    _bad(DataError(f"{path}:{n}: malformed JSON ({e.msg})"), skip_bad, skipped)
    for where, obj in items:
        try:
            rec = _record(obj, where, root)
            if rec.id in seen:
                raise DataError(f"{where}: duplicate id {rec.id!r}")
        except (DataError, KeyError, IndexError, TypeError) as e:
            err = e if isinstance(e, DataError) else DataError(f"{where}: malformed record ({type(e).__name__}: {e})")
            _bad(err, skip_bad, skipped)
            continue
        seen.add(rec.id)
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no records" + (f" left after skipping {len(skipped)} bad ones" if skipped else ""))
    return records


def _bad(err: DataError, skip_bad: bool, skipped: dict | None) -> None:
    """Raise a bad-input error, or (skip_bad) log it and note it in `skipped`."""
    if not skip_bad:
        raise err
    where = str(err).split(": ", 1)[0]
    if skipped is not None and where not in skipped:
        skipped[where] = str(err)
        print(f"skipping bad record: {err}", file=sys.stderr)


def run_order(n: int, needed: int, seed: int) -> list[int]:
    """Record indices for a whole training run: a fresh seeded shuffle per epoch, concatenated. The position in
    it is a function of the step alone, which is what lets --resume continue mid-epoch."""
    rng, order = random.Random(seed), []
    while len(order) < needed:
        perm = list(range(n))
        rng.shuffle(perm)
        order += perm
    return order[:needed]


# -----------------------------------------------------------------------------
# Video decoding (decord): sample at `fps`, at most `max_frames`, decode only the sampled frames


def sample_indices(num_frames: int, native_fps: float, fps: float, max_frames: int) -> np.ndarray:
    """Frame indices at `fps` (one every native_fps/fps frames, from frame 0); if that gives more than
    `max_frames`, `max_frames` indices spread uniformly over the whole clip instead."""
    step = native_fps / fps
    idx = np.floor(np.arange(0, num_frames, step)).astype(int) if step > 0 else np.array([0])
    if len(idx) > max_frames:
        idx = np.round(np.linspace(0, num_frames - 1, max_frames)).astype(int)
    return idx[idx < num_frames]


def read_video(path: str, fps: float = FPS, max_frames: int = MAX_FRAMES, rid: str = "?"):
    """Return (frames uint8 (T, H, W, 3), transformers VideoMetadata with the real fps and frame indices)."""
    import decord
    from transformers.video_utils import VideoMetadata

    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        n, native = len(vr), float(vr.get_avg_fps())
    except Exception as e:  # decord raises its own DECORDError on unreadable files
        raise DataError(f"record {rid}: cannot decode video {path} ({type(e).__name__}: {str(e)[:200]})") from None
    if n == 0 or native <= 0:
        raise DataError(f"record {rid}: video {path} has no frames")
    if n / native < 1 / fps:  # not even one sampling interval: the clip would be read as a still image
        raise DataError(f"record {rid}: video {path} lasts {n / native:.3g} s, shorter than one frame at --fps {fps:g} "
                        f"({1 / fps:.3g} s); raise --fps or drop the record")
    idx = sample_indices(n, native, fps, max_frames)
    frames = vr.get_batch(idx.tolist()).asnumpy()  # (T, H, W, 3)
    meta = VideoMetadata(total_num_frames=n, fps=native, height=frames.shape[1], width=frames.shape[2],
                         duration=n / native, video_backend="decord", frames_indices=idx.tolist())
    return frames, meta


# -----------------------------------------------------------------------------
# Prompts: the model's own chat template, then the alarm tokens


def end_of_turn(processor) -> str:
    tok = processor.tokenizer
    return "<|im_end|>" if "<|im_end|>" in tok.get_vocab() else tok.eos_token


def build_prompt(processor, query: str, *, has_video: bool, structured: bool, alarm: bool) -> str:
    """The user turn (video, then query) through the model's chat template; with `structured`, the
    structured-output instruction is the system turn.

    Alarm tokens (when `alarm`): <|textual_alarm|> ends the user text, just before the end-of-turn token;
    <|visual_alarm|> goes right after the video block (after the last frame's tokens). A text-only
    prompt gets both at the end of the text.

    Why the instruction goes in the system turn: the textual alarm then follows the query itself in
    every stage's prompt (AT-SFT's plain prompts and the structured ones of cold start, GRPO and eval),
    so the ATC heads trained in AT-SFT read the same local context later.
    """
    text = query.strip()
    if alarm:
        text += ("" if has_video else VISUAL_ALARM) + TEXTUAL_ALARM
    content = ([{"type": "video"}] if has_video else []) + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if structured:
        messages.insert(0, {"role": "system", "content": STRUCTURED_INSTRUCTION})
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if alarm and has_video:
        vt = processor.video_token
        i = prompt.index(vt) + len(vt)
        end = "<|vision_end|>"  # Qwen wraps the video in <|vision_start|> ... <|vision_end|>: go after it
        if prompt.startswith(end, i) and end in processor.tokenizer.get_vocab():
            i += len(end)
        prompt = prompt[:i] + VISUAL_ALARM + prompt[i:]
    return prompt


# -----------------------------------------------------------------------------
# Batching: left-padded prompts (+ targets for SFT, loss only on the assistant's tokens)


def collate(llm, records: list[Record], *, structured: bool, with_target: bool, no_video: bool = False,
            fps: float = FPS, max_frames: int = MAX_FRAMES, alarm: bool | None = None,
            skip_bad: bool = False, skipped: dict | None = None) -> dict | None:
    """Turn records into one model batch (tensors on llm.device).

    with_target: append each record's target and the end-of-turn token, and set labels (-100 everywhere
    but on those assistant tokens). Otherwise the batch is a generation prompt.
    alarm: put alarm tokens in the prompt (default: iff the model has them).
    skip_bad: a record whose video cannot be decoded is left out (and noted in `skipped`) instead of
    raising DataError; never replaced by another. The batch's "records" are the ones kept (None if none).
    """
    proc = llm.processor
    alarm = llm.alarm is not None if alarm is None else alarm
    eot = end_of_turn(proc)
    texts, videos, metas, kept = [], [], [], []
    for r in records:
        has_video = r.video is not None and not no_video
        if has_video:
            try:
                frames, meta = read_video(r.video, fps=fps, max_frames=max_frames, rid=r.id)
            except DataError as e:
                _bad(DataError(f"record {r.id} ({r.where}): {str(e).split(': ', 1)[-1]}"), skip_bad, skipped)
                continue
            videos.append(frames)
            metas.append(meta)
        text = build_prompt(proc, r.query, has_video=has_video, structured=structured, alarm=alarm)
        texts.append(text + (r.target + eot if with_target else ""))
        kept.append(r)
    if not kept:
        return None
    records = kept
    kw = dict(videos=videos, video_metadata=metas, do_sample_frames=False) if videos else {}
    proc.tokenizer.padding_side = "left"
    batch = dict(proc(text=texts, padding=True, return_tensors="pt", **kw))
    ids = batch["input_ids"]
    if alarm and videos:  # the visual alarm must sit right after the expanded video tokens
        _check_visual_alarm(llm, ids, records)
    out = {"model_keys": tuple(batch.keys()), "has_alarm": alarm, "records": records, **batch}
    if with_target:
        labels = torch.full_like(ids, -100)
        for row, r in enumerate(records):
            tgt = proc.tokenizer(r.target + eot, add_special_tokens=False)["input_ids"]
            if ids[row, -len(tgt):].tolist() != tgt:
                raise DataError(f"record {r.id}: target does not tokenise the same alone and after the prompt")
            labels[row, -len(tgt):] = ids[row, -len(tgt):]  # left padding: the target ends every row
        out["labels"] = labels
    out["video_label"] = torch.tensor([r.video_label for r in records], dtype=torch.float32)
    out["text_label"] = torch.tensor([r.text_label for r in records], dtype=torch.float32)
    return {k: (v.to(llm.device) if torch.is_tensor(v) else v) for k, v in out.items()}


def _check_visual_alarm(llm, ids: torch.Tensor, records) -> None:
    vid = llm.tokenizer.convert_tokens_to_ids(VISUAL_ALARM)
    ok = {llm.model.config.video_token_id, getattr(llm.model.config, "vision_end_token_id", None)}
    for row in range(ids.shape[0]):
        if records[row].video is None:  # a text-only row of a mixed batch: its alarm ends the text
            continue
        pos = (ids[row] == vid).nonzero()
        if len(pos) and int(ids[row, int(pos[-1]) - 1]) not in ok:
            raise DataError(f"record {records[row].id}: visual alarm is not right after the video tokens")
