"""data.py: records, video decoding, prompts with alarm tokens, batching, and the built-in demo.

Record format (JSONL, one object per line; the README documents it):
    {"id": "hh-0001", "video": "videos/hh-0001.mp4",   # relative to the JSONL's folder, or absolute; null = text only
     "query": "How do I ...?", "target": "...",             # plain for AT-SFT, structured for cold start / GRPO / eval
     "video_label": 1, "text_label": 1,                     # 1 harmful, 0 safe
     "subset": "HH", "category": "violence", "subcategory": "weapons", "language": "en"}
An image record has "image" (a path or a list of paths, relative like "video") instead of "video"; its
video_label is the label of its images (the visual label).
The authors' formats are read as they are (a .json list or JSONL): VideoLLaMA3 conversations
({"video": [...] or "image": ..., "conversations": [{"from": "human", ...}, {"from": "gpt", ...}, ...],
"safety_labels": {...}}), multi-turn ones kept whole (`Record.turns`, every answer supervised), and GRPO rows
({"path", "problem", "solution"} with the labels in the solution's <vidType>/<textType> tags).

The built-in demo data set lives in demo.py (`python demo.py --out demo_data`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import recipe as RC
from alarm import TEXTUAL_ALARM, VISUAL_ALARM
from rewards import format_reward

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
    image: list[str] | None = None  # absolute paths of the record's images (instead of a video); None: no image
    turns: list[list[str]] | None = None  # a multi-turn conversation's later exchanges: [[user, assistant], ...]
    meta: dict = field(default_factory=dict)  # a benchmark's own fields (benchmarks.py): its subset, judge query, ...

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("where")
        return d


@contextlib.contextmanager
def text_file(path: str, **kw):
    """`open(path)` as UTF-8 text; a file in another encoding (Latin-1 from a spreadsheet, ...) is a DataError
    naming it, wherever in the reading the bad byte comes."""
    try:
        with open(path, encoding=kw.pop("encoding", "utf-8"), **kw) as f:
            yield f
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8") from None


def _label(value, what: str, where: str) -> int:
    if isinstance(value, bool) or value not in (0, 1, "0", "1"):
        raise DataError(f"{where}: {what} must be 0 (safe) or 1 (harmful), got {value!r}")
    return int(value)


def _record(obj: dict, where: str, root: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    source = {}  # where the authors' formats keep a field, for the error naming it
    if "conversations" in obj:  # the authors' VideoLLaMA3 SFT format
        obj = _conversation(obj, where)
        source = {"video_label": "safety_labels.visual or visual_safety_label",
                  "text_label": "safety_labels.textual or textual_safety_label"}
    elif "problem" in obj and "solution" in obj:  # the authors' GRPO format
        source = {"video_label": "<vidType> in solution", "text_label": "<textType> in solution"}
        sol = str(obj["solution"])
        tag = lambda t: (re.search(rf"<{t}>\s*(.*?)\s*</{t}>", sol, re.S) or [None, None])[1]
        obj = {"id": obj.get("problem_id", where), "video": obj.get("path"), "query": obj["problem"],
               "target": sol, "video_label": tag("vidType"), "text_label": tag("textType")}
    for key in ("id", "query", "target", "video_label", "text_label"):
        if key not in obj or obj[key] is None:
            raise DataError(f"{where}: missing field {key!r}" + (f" ({source[key]})" if key in source else ""))
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
        video = media_file(video, root, "video", f"{where} (id {rid})")
    image = obj.get("image")
    if image is not None:
        if video is not None:
            raise DataError(f"{where} (id {rid}): a record has a video or images, not both")
        paths = [image] if isinstance(image, str) else image
        if not isinstance(paths, list) or not paths or not all(isinstance(x, str) and x for x in paths):
            raise DataError(f"{where} (id {rid}): image must be a path or a non-empty list of paths")
        image = [media_file(x, root, "image", f"{where} (id {rid})") for x in paths]
    turns = obj.get("turns")
    if turns is not None and (not isinstance(turns, list) or not all(
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in turns)):
        raise DataError(f"{where} (id {rid}): turns must be a list of [user, assistant] string pairs")
    return Record(id=rid, video=video, query=obj["query"], target=obj["target"],
                  video_label=_label(obj["video_label"], "video_label", f"{where} (id {rid})"),
                  text_label=_label(obj["text_label"], "text_label", f"{where} (id {rid})"),
                  subset=subset, category=str(obj.get("category", "")),
                  subcategory=str(obj.get("subcategory", "")), language=str(obj.get("language", "en")), where=where,
                  image=image, turns=[list(t) for t in turns] if turns else None)


def media_file(path: str, root: str, kind: str, where: str) -> str:
    """`path` (relative to `root`, or absolute) as an absolute path to an existing, non-empty file, or DataError
    naming it (a folder, a missing file and an empty one each say so)."""
    full = path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))
    if os.path.isdir(full):
        raise DataError(f"{where}: {kind} {full} is a directory, not a file")
    if not os.path.isfile(full):
        raise DataError(f"{where}: {kind} not found: {full}")
    if os.path.getsize(full) == 0:  # a failed download or copy; decord would print its own error first
        raise DataError(f"{where}: {kind} {full} is empty (0 bytes)")
    return full


def _conversation(obj: dict, where: str) -> dict:
    """The authors' VideoLLaMA3 conversations record as our fields, every turn kept.

    Turns alternate human, gpt, starting with human and ending with gpt (the authors' train.py drops leading
    non-human turns with a warning; here such a record is refused, never cut). The first exchange is query / target,
    the later ones go to `turns`; every answer is supervised (data.collate). The <image> / <video> tags may only be in
    the first human turn and must match the record's images / video in number. Where the authors' processor puts each
    visual at its tag, we put the visuals before the text of the first turn, as for every record (the LLaVA data
    has its tag at the start or the end of that turn)."""
    turns, rid = obj["conversations"], obj.get("id", where)
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: conversations must be a list of {{\"from\", \"value\"}} turns")
    for i, t in enumerate(turns):
        role, want = str(t.get("from", "")).lower(), ("human", "user") if i % 2 == 0 else ("gpt", "assistant")
        if role not in want:
            raise DataError(f"{where} (id {rid}): conversations[{i}] is from {t.get('from')!r} where a {want[0]!r} "
                            "turn belongs: turns must alternate human, gpt, starting with human (none is dropped)")
        if not isinstance(t.get("value"), str):
            raise DataError(f"{where} (id {rid}): conversations[{i}].value must be a string")
    if len(turns) < 2 or len(turns) % 2:
        raise DataError(f"{where} (id {rid}): conversations must end with a gpt answer ({len(turns)} turns)")
    image, video = obj.get("image"), obj.get("video")
    if isinstance(video, list):
        if len(video) != 1:
            raise DataError(f"{where} (id {rid}): video must be one path (a list of {len(video)} given)")
        video = video[0]
    texts = [t["value"] for t in turns]
    for tag, given, kind in (("<image>", image, "image"), ("<video>", video, "video")):
        n = len(given) if isinstance(given, list) else int(given is not None)
        if any(tag in x for x in texts[1:]):
            raise DataError(f"{where} (id {rid}): {tag} after the first human turn is not supported (visuals go "
                            "in the first turn)")
        if texts[0].count(tag) not in (0, n):
            raise DataError(f"{where} (id {rid}): the first turn has {texts[0].count(tag)} {tag} tags for {n} {kind} "
                            "file(s)")
        texts[0] = re.sub(rf"{tag}\s*", "", texts[0])
    labels = obj.get("safety_labels") or {}
    return {"id": rid, "video": video, "image": image, "query": texts[0], "target": texts[1],
            "turns": [texts[i:i + 2] for i in range(2, len(texts), 2)] or None,
            "video_label": labels.get("visual", obj.get("visual_safety_label")),
            "text_label": labels.get("textual", obj.get("textual_safety_label"))}


def structured_target(text: str) -> bool:
    """Is `text` in the structured format <think>…</think><answer>…</answer><vidType>…</vidType><textType>…
    </textType>? The reward's own format check (rewards.format_reward): one definition of the format."""
    return format_reward(text) == 1.0


MULTI_TURN_PROMPT = ("a multi-turn conversation is training data (SFT); a prompt to answer (GRPO, eval) must be one "
                     "user turn")


def load_records(path: str, *, skip_bad: bool = False, skipped: dict | None = None,
                 structured: bool = False, prompt_only: bool = False) -> list[Record]:
    """Read a JSONL file of records (or the authors' .json list).

    structured: the stage needs targets in the structured format (cold start trains on them, GRPO's reward reads
    them); a record whose target is not is bad input.
    prompt_only: the records are prompts to answer (GRPO, eval); a multi-turn conversation is bad input here, so
    it fails when the data are read, not when its batch is built after the model loaded (collate checks it too).
    A bad row raises DataError, or with skip_bad=True is left out and noted in `skipped` (where -> why)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    root = os.path.dirname(os.path.abspath(path))
    records, seen = [], set()
    with text_file(path) as f:
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
            if prompt_only and rec.turns:
                raise DataError(f"{where} (id {rec.id}): {MULTI_TURN_PROMPT}")
            if structured and not rec.turns and not structured_target(rec.target):
                raise DataError(f"{where} (id {rec.id}): target is not in the structured format this stage needs "
                                "(<think>…</think><answer>…</answer><vidType>0|1</vidType><textType>0|1</textType>, "
                                f"in this order, each once): {rec.target[:60]!r}")
        except (DataError, KeyError, IndexError, TypeError) as e:
            err = e if isinstance(e, DataError) else DataError(f"{where}: malformed record ({type(e).__name__}: {e})")
            _bad(err, skip_bad, skipped)
            continue
        seen.add(rec.id)
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no records" + (f" left after skipping {len(skipped)} bad ones" if skipped else ""))
    return records


def bad_record(err: DataError, skip_bad: bool, skipped: dict | None) -> None:
    """Raise a bad-input error, or (skip_bad) log it and note it in `skipped` (its where -> the message)."""
    if not skip_bad:
        raise err
    where = str(err).split(": ", 1)[0]
    if skipped is not None and where not in skipped:
        skipped[where] = str(err)
        print(f"skipping bad record: {err}", file=sys.stderr)


_bad = bad_record  # the short name this module uses


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
    `max_frames`, `max_frames` indices spread uniformly over the whole clip instead. The sampler of a model
    without a video processor of its own (build_data's static filter and labeller frames use it too)."""
    step = native_fps / fps
    idx = np.floor(np.arange(0, num_frames, step)).astype(int) if step > 0 else np.array([0])
    if len(idx) > max_frames:
        idx = np.round(np.linspace(0, num_frames - 1, max_frames)).astype(int)
    return idx[idx < num_frames]


def served_sampling(fps: float, max_frames: int) -> dict:
    """The video processor settings under which transformers samples a video path itself, at the run's fps and
    frame cap: what a saved checkpoint's processor holds (model.save_checkpoint), and what frame_sampler uses."""
    return {"do_sample_frames": True, "fps": float(fps), "max_frames": int(max_frames), "num_frames": None}


def frame_sampler(processor, fps: float = FPS, max_frames: int = MAX_FRAMES):
    """The frame indices the model's own video processor picks from a clip at `fps` and at most `max_frames`
    (a function of a VideoMetadata), or None for a processor without a sampler that honours a frame cap.

    Why the model's own rule and not sample_indices: a saved checkpoint's processor samples a video path itself
    (served_sampling), so training, eval and a plain transformers or vLLM user then see the same frames on every
    clip. The families differ: Qwen2.5-VL takes an even count, at least 4 (min_frames), spread from frame 0;
    VideoLLaMA3 the same with any count; Qwen3-VL spreads them from the first frame to the last."""
    import copy

    vp = getattr(processor, "video_processor", None)
    if vp is None or not hasattr(vp, "sample_frames") or not hasattr(vp, "max_frames"):
        return None
    vp = copy.copy(vp)  # the served settings on a copy: the processor itself keeps handing frames through
    for k, v in served_sampling(fps, max_frames).items():
        setattr(vp, k, v)

    def sample(meta) -> np.ndarray:
        return np.asarray(vp.sample_frames(metadata=meta), dtype=np.int64)  # the attributes, as at serve time

    return sample


def read_video(path: str, fps: float = FPS, max_frames: int = MAX_FRAMES, rid: str = "?", sampler=None):
    """Return (frames uint8 (T, H, W, 3), transformers VideoMetadata with the real fps and frame indices).
    sampler: frame_sampler's function (the model's own rule); None = sample_indices."""
    import decord
    from transformers.video_utils import VideoMetadata

    if os.path.isdir(path):
        raise DataError(f"record {rid}: video {path} is a directory, not a file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:  # decord would print its own "ERROR opening" line first
        raise DataError(f"record {rid}: video {path} is empty (0 bytes)")
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
    if sampler is None:
        idx = sample_indices(n, native, fps, max_frames)
    else:
        try:
            idx = sampler(VideoMetadata(total_num_frames=n, fps=native, duration=n / native))
        except (ValueError, ZeroDivisionError) as e:  # a clip too short for the family's rule (Qwen: 2 frames)
            raise DataError(f"record {rid}: the model's video processor cannot sample video {path} ({n} frames at "
                            f"{native:g} fps): {type(e).__name__}: {str(e)[:200]}") from None
        if len(idx) == 0:
            raise DataError(f"record {rid}: the model's video processor samples no frame of video {path} "
                            f"({n} frames at {native:g} fps); raise --fps or drop the record")
    frames = vr.get_batch(idx.tolist()).asnumpy()  # (T, H, W, 3)
    meta = VideoMetadata(total_num_frames=n, fps=native, height=frames.shape[1], width=frames.shape[2],
                         duration=n / native, video_backend="decord", frames_indices=idx.tolist())
    return frames, meta


def read_image(path: str, rid: str = "?"):
    """An image file as an RGB PIL image (the processors resize it to their own budget)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # decodes the whole file: a truncated one fails here, not in the processor
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ... on bad files
        raise DataError(f"record {rid}: cannot decode image {path} ({type(e).__name__}: {str(e)[:200]})") from None


# -----------------------------------------------------------------------------
# Prompts: the model's own chat template, then the alarm tokens


def end_of_turn(processor) -> str:
    tok = processor.tokenizer
    return "<|im_end|>" if "<|im_end|>" in tok.get_vocab() else tok.eos_token


def build_prompt(processor, query: str, *, has_video: bool, structured: bool, alarm: bool, n_images: int = 0,
                 template: str = "paper") -> str:
    """The user turn (video or `n_images` images, then query) through the model's chat template; with `structured`,
    the structured-output instruction: the system turn (template "paper"), or the authors' QUESTION_TEMPLATE +
    TYPE_TEMPLATE after the query in the user turn, with no system turn (template "authors", recipe.py).

    Alarm tokens (when `alarm`): <|textual_alarm|> ends the user text, just before the end-of-turn token;
    <|visual_alarm|> goes right after the video block (after the last frame's tokens), or right after the last
    image's block. A text-only prompt gets both at the end of the text.

    Why the paper's instruction goes in the system turn: the textual alarm then follows the query itself in
    every stage's prompt (AT-SFT's plain prompts and the structured ones of cold start, GRPO and eval),
    so the ATC heads trained in AT-SFT read the same local context later. The authors' textual alarm follows
    their instruction instead (their processor puts it before the user turn's end).
    """
    authors = structured and template == "authors"
    text, visual = (RC.authors_question(query) if authors else query.strip()), has_video or n_images > 0
    if alarm:
        text += ("" if visual else VISUAL_ALARM) + TEXTUAL_ALARM
    content = ([{"type": "video"}] if has_video else []) + [{"type": "image"}] * n_images
    messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
    if structured and not authors:
        messages.insert(0, {"role": "system", "content": STRUCTURED_INSTRUCTION})
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if alarm and visual:
        vt = processor.video_token if has_video else processor.image_token  # the last visual placeholder
        i = prompt.rindex(vt) + len(vt)
        end = "<|vision_end|>"  # Qwen wraps a video or image in <|vision_start|> ... <|vision_end|>: go after it
        if prompt.startswith(end, i) and end in processor.tokenizer.get_vocab():
            i += len(end)
        prompt = prompt[:i] + VISUAL_ALARM + prompt[i:]
    return prompt


def serving_template(processor, *, structured: bool, template: str = "paper") -> str:
    """The processor's chat template wrapped so that plain `apply_chat_template` writes what `build_prompt` writes:
    the first user turn is put in the project's order (its videos and images first, then its text, as every stage
    trained; a string content is its text), <|textual_alarm|> ends its (trimmed) last text (a turn with none gets an
    empty one), <|visual_alarm|> goes after the last video
    (or, with no video, image) placeholder and its <|vision_end|>, both end the text of a text-only turn; with
    `structured`, STRUCTURED_INSTRUCTION is the system turn when the messages have none (template "paper"), or the
    first user turn's last text is wrapped in the authors' templates (template "authors"; no system turn added).
    Saved in checkpoints (model.save_checkpoint, with the recipe the checkpoint was trained with); the project
    itself keeps building prompts from the plain template."""
    base = processor.chat_template
    vocab = processor.tokenizer.get_vocab()
    end = "<|vision_end|>" if "<|vision_end|>" in vocab else ""
    sysmsg = json.dumps(STRUCTURED_INSTRUCTION)
    authors = structured and template == "authors"
    q_pre, q_post = RC.QUESTION_TEMPLATE.split("{Question}")
    # the user text as build_prompt writes it: trimmed (paper), or inside the authors' templates, then trimmed
    user_text = ("(" + json.dumps(q_pre) + " ~ it['text'] ~ " + json.dumps(q_post + RC.TYPE_TEMPLATE) + ") | trim"
                 if authors else "it['text'] | trim")
    pre = ("{%- set ns = namespace(msgs=[], first=true, vis='', c=[], vs=[], t=[], last=-1) -%}"
           + ("{%- if messages[0]['role'] != 'system' -%}{%- set ns.msgs = [{'role': 'system', 'content': " + sysmsg + "}] -%}{%- endif -%}" if structured and not authors else "")
           + "{%- for m in messages -%}"
           "{%- if m['role'] == 'user' and ns.first -%}"
           "{%- set ns.first = false -%}{%- set ns.c = [] -%}{%- set ns.vs = [] -%}{%- set ns.t = [] -%}{%- set ns.last = -1 -%}"
           "{%- set items = [{'type': 'text', 'text': m['content']}] if m['content'] is string else m['content'] -%}"
           "{%- for it in items -%}{%- if it['type'] in ('video', 'image') -%}{%- set ns.vs = ns.vs + [it['type']] -%}{%- set ns.c = ns.c + [it] -%}"
           "{%- else -%}{%- if it['type'] == 'text' -%}{%- set ns.last = ns.t | length -%}{%- endif -%}{%- set ns.t = ns.t + [it] -%}{%- endif -%}{%- endfor -%}"
           "{%- if ns.last < 0 -%}{%- set ns.last = ns.t | length -%}{%- set ns.t = ns.t + [{'type': 'text', 'text': ''}] -%}{%- endif -%}"
           "{%- set ns.vis = ('video' if 'video' in ns.vs else ('image' if ns.vs else '')) -%}"
           "{%- for it in ns.t -%}{%- if loop.index0 == ns.last -%}"
           "{%- set ns.c = ns.c + [{'type': 'text', 'text': (" + user_text + ") ~ ('' if ns.vis else '" + VISUAL_ALARM + "') ~ '" + TEXTUAL_ALARM + "'}] -%}"
           "{%- else -%}{%- set ns.c = ns.c + [it] -%}{%- endif -%}{%- endfor -%}"
           "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': ns.c}] -%}"
           "{%- else -%}{%- set ns.msgs = ns.msgs + [m] -%}{%- endif -%}{%- endfor -%}"
           "{%- set messages = ns.msgs -%}"
           "{%- set out -%}")
    vt, it = processor.video_token, processor.image_token
    post = ("{%- endset -%}"
            "{%- set mark = ('" + vt + "' if ns.vis == 'video' else ('" + it + "' if ns.vis == 'image' else '')) -%}"
            "{%- if mark and '" + end + "' and (mark ~ '" + end + "') in out -%}{%- set mark = mark ~ '" + end + "' -%}{%- endif -%}"
            "{%- if mark -%}{%- set parts = out.split(mark) -%}"
            "{{- parts[:-1] | join(mark) ~ mark ~ '" + VISUAL_ALARM + "' ~ parts[-1] -}}"
            "{%- else -%}{{- out -}}{%- endif -%}")
    return pre + base + post


def conversation_tail(processor, target: str, turns: list, *, structured: bool,
                      template: str = "paper") -> tuple[str, list[tuple[int, int]]]:
    """What follows the first user turn's prompt in a multi-turn conversation: the first answer, then each later
    user turn and answer, as the model's chat template writes them. Returns (text, spans): spans are the
    (start, end) characters of each answer with its end-of-turn token, the parts the loss is on.

    Only the first user turn carries the visuals and the alarm tokens (the authors' processor: alarms in the first
    user turn only). A template that rewrites earlier answers (some drop <think> from past turns) cannot be
    supervised as written: DataError."""
    eot = end_of_turn(processor)
    user = lambda text: {"role": "user", "content": [{"type": "text", "text": text}]}
    msgs = [{"role": "system", "content": STRUCTURED_INSTRUCTION}] if structured and template != "authors" else []
    msgs += [user("."), {"role": "assistant", "content": target}]
    text, spans = target + eot, [(0, len(target + eot))]
    for question, answer in turns:
        before = processor.apply_chat_template(msgs, tokenize=False)
        msgs.append(user(question))
        after = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        end = before.rfind(msgs[-2]["content"] + eot) + len(msgs[-2]["content"] + eot)
        if not after.startswith(before) or end < len(eot) + len(msgs[-2]["content"]):
            raise DataError("the chat template does not write a multi-turn conversation's answers as they are; "
                            "train on its first exchange only (drop the later turns from the data)")
        text += after[end:]
        spans.append((len(text), len(text) + len(answer + eot)))
        text += answer + eot
        msgs.append({"role": "assistant", "content": answer})
    return text, spans


# -----------------------------------------------------------------------------
# Batching: left-padded prompts (+ targets for SFT, loss only on the assistant's tokens)


def max_length(llm) -> int:
    """The most tokens the model takes: its position budget, or its tokenizer's model_max_length if smaller."""
    n = getattr(llm.model.config.get_text_config(), "max_position_embeddings", None) or 10**9
    tok = getattr(llm.processor.tokenizer, "model_max_length", None) or 10**9  # "unset" is a huge number
    return int(min(n, tok))


_unsupported_budget: set = set()  # processor families already told that the visual budget does not apply


def visual_budget(processor, visual: tuple[int, int] | None) -> dict:
    """Processor kwargs that set a visual budget (merge size, most visual tokens after merging), as the authors'
    VideoLLaMA3 image processor does it: each frame is resized to multiples of patch × merge, the pixels of all a
    video's frames together at most tokens × (patch × merge)² and each frame at least 16 merged tokens.
    transformers' VideoLLaMA3 processors take exactly these knobs (merge_size; size = {shortest_edge: min pixels,
    longest_edge: max pixels, divided over the frames}); an image gets the whole budget (theirs divides it over a
    record's images: the same for one image). Other families (Qwen-VL: the merge size is part of the model) keep
    their defaults, said once. None: {} (the processor's defaults, the paper's setting)."""
    if not visual:
        return {}
    merge, tokens = visual
    vp = getattr(processor, "video_processor", None)
    if type(vp).__name__ != "VideoLlama3VideoProcessor":
        family = type(processor).__name__
        if family not in _unsupported_budget:
            _unsupported_budget.add(family)
            print(f"note: {family} has no merge-size / visual-token knobs; the authors' visual budget (merge {merge}, "
                  f"{tokens} tokens) is not applied, its defaults are kept", file=sys.stderr)
        return {}
    f = vp.patch_size * merge
    size = {"shortest_edge": RC.MIN_VISUAL_TOKENS * f * f, "longest_edge": tokens * f * f}
    return {"videos_kwargs": {"merge_size": merge, "size": size}, "images_kwargs": {"merge_size": merge, "size": size}}


def truncate_rows(llm, batch: dict, limit: int) -> dict:
    """The authors' collator: every row cut to its first `limit` tokens (labels alike), said loudly per record.
    A left-padded row keeps its first `limit` real tokens and is padded again on the left. A cut that reaches the
    visual tokens or an alarm token would break the row (the model needs them all): DataError naming the record."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B, T = ids.shape
    n = mask.sum(1).tolist()
    if max(n) <= limit:
        return batch
    keep = min(max(n), limit)
    cfg, tok = llm.model.config, llm.tokenizer
    needed = {getattr(cfg, "video_token_id", None), getattr(cfg, "image_token_id", None),
              *tok.convert_tokens_to_ids([VISUAL_ALARM, TEXTUAL_ALARM])} - {None, tok.unk_token_id}
    for b, r in enumerate(batch["records"]):
        if n[b] > limit:
            gone = ids[b, T - n[b] + limit:]
            if any(int(t) in needed for t in gone.unique()):
                raise DataError(f"record {r.id} ({r.where}): {n[b]} tokens; cutting it at {limit} (--recipe authors) "
                                "would drop visual or alarm tokens")
            print(f"truncated record {r.id} ({r.where}): {n[b]} -> {limit} tokens (--recipe authors: the authors' "
                  f"collator cuts at {limit}; the end of its target is not trained on)", file=sys.stderr)
    fill = {"input_ids": tok.pad_token_id, "labels": -100}
    out = dict(batch)
    for k, v in batch.items():
        per_token = k in ("input_ids", "attention_mask", "labels") or k.endswith("token_type_ids")
        if per_token and torch.is_tensor(v) and tuple(v.shape[:2]) == (B, T):
            rows = []
            for b in range(B):
                seg = v[b, T - n[b]:T - n[b] + min(n[b], limit)]
                pad = torch.full((keep - seg.shape[0], *seg.shape[1:]), fill.get(k, 0), dtype=v.dtype, device=v.device)
                rows.append(torch.cat([pad, seg]))
            out[k] = torch.stack(rows)
    return out


def collate(llm, records: list[Record], *, structured: bool, with_target: bool, no_video: bool = False,
            fps: float = FPS, max_frames: int = MAX_FRAMES, alarm: bool | None = None,
            skip_bad: bool = False, skipped: dict | None = None, max_new_tokens: int = 0, template: str = "paper",
            visual: tuple[int, int] | None = None, truncate: int = 0) -> dict | None:
    """Turn records into one model batch (tensors on llm.device).

    with_target: append each record's target and the end-of-turn token, and set labels (-100 everywhere
    but on those assistant tokens); a multi-turn record gets all its turns, with labels on every answer.
    Otherwise the batch is a generation prompt (a multi-turn record cannot be one: DataError).
    no_video: leave out every visual input, videos and images alike.
    alarm: put alarm tokens in the prompt (default: iff the model has them).
    skip_bad: a record whose video or image cannot be decoded is left out (and noted in `skipped`) instead of
    raising DataError; never replaced by another. The batch's "records" are the ones kept (None if none).
    max_new_tokens: room the caller will generate into. A row longer than max_length(llm) less that room is bad
    input (DataError naming every such record with its length, or skipped with skip_bad): cutting it to fit, as
    the authors' loader does, would silently drop the end of a query or of a target, and passing it on would
    run the model far past what it was trained for (and out of memory).
    template, visual, truncate: the recipe's prompt settings (recipe.prompt_kwargs; the defaults are the paper's):
    where the structured instruction goes (build_prompt), the visual budget (merge size, most visual tokens;
    `visual_budget`), and, with a target, the length the authors' collator cuts rows to (`truncate_rows`; 0 = never).
    """
    proc = llm.processor
    alarm = llm.alarm is not None if alarm is None else alarm
    eot = end_of_turn(proc)
    texts, videos, metas, images, kept, tails = [], [], [], [], [], []
    sampler = frame_sampler(proc, fps, max_frames)  # the frames a served checkpoint's processor would pick
    for r in records:
        has_video = r.video is not None and not no_video
        try:
            if r.turns and not with_target:
                raise DataError(MULTI_TURN_PROMPT)
            video = (read_video(r.video, fps=fps, max_frames=max_frames, rid=r.id, sampler=sampler)
                     if has_video else None)
            pics = [] if no_video else [read_image(x, rid=r.id) for x in r.image or []]
            tail = None  # a multi-turn record's turns after the prompt (with_target): (text, answer spans)
            if r.turns:
                tail = conversation_tail(proc, r.target, r.turns, structured=structured, template=template)
        except DataError as e:  # named, never replaced by another record
            _bad(DataError(f"record {r.id} ({r.where}): {str(e).split(': ', 1)[-1]}"), skip_bad, skipped)
            continue
        if video is not None:
            videos.append(video[0])
            metas.append(video[1])
        images += pics
        text = build_prompt(proc, r.query, has_video=has_video, structured=structured, alarm=alarm,
                            n_images=len(pics), template=template)
        texts.append(text + (tail[0] if tail else r.target + eot if with_target else ""))
        tails.append(tail)
        kept.append(r)
    if not kept:
        return None
    records = kept
    kw = dict(videos=videos, video_metadata=metas, do_sample_frames=False) if videos else {}
    if images:
        kw["images"] = images  # in prompt order, as the processors take them
    if videos or images:
        kw.update(visual_budget(proc, visual))
    proc.tokenizer.padding_side = "left"
    batch = dict(proc(text=texts, padding=True, return_tensors="pt", **kw))
    ids = batch["input_ids"]
    cut = truncate if with_target else 0  # the authors cut training rows only
    lengths = [min(n, cut) if cut else n for n in batch["attention_mask"].sum(1).tolist()]
    limit = max_length(llm) - max_new_tokens
    if too_long := [(r, n) for r, n in zip(records, lengths) if n > limit]:
        room = f" less {max_new_tokens} for the answer" if max_new_tokens else ""
        what = "prompt + target" if with_target else "prompt"
        if not skip_bad:
            named = ", ".join(f"{r.id} ({r.where}): {n} tokens" for r, n in too_long[:5])
            raise DataError(f"{len(too_long)} record(s) too long for the model, whose {what} must fit in "
                            f"{max_length(llm)} tokens{room} = {limit}: {named}; shorten them, or pass "
                            "--skip-bad-records to leave them out")
        for r, n in too_long:
            _bad(DataError(f"record {r.id} ({r.where}): {what} is {n} tokens, longer than the model's "
                           f"{max_length(llm)}{room} = {limit}"), True, skipped)
        bad_ids = {r.id for r, _ in too_long}
        keep = [r for r in records if r.id not in bad_ids]
        return collate(llm, keep, structured=structured, with_target=with_target, no_video=no_video, fps=fps,
                       max_frames=max_frames, alarm=alarm, skip_bad=True, skipped=skipped,
                       max_new_tokens=max_new_tokens, template=template, visual=visual,
                       truncate=truncate) if keep else None
    if alarm and (videos or images):  # the visual alarm must sit right after the expanded visual tokens
        _check_visual_alarm(llm, ids, records)
    out = {"model_keys": tuple(batch.keys()), "has_alarm": alarm, "records": records, **batch}
    if with_target:
        labels = torch.full_like(ids, -100)
        for row, r in enumerate(records):
            if tails[row] is not None:
                _label_answers(proc.tokenizer, ids[row], labels[row], *tails[row], r.id)
                continue
            tgt = proc.tokenizer(r.target + eot, add_special_tokens=False)["input_ids"]
            if ids[row, -len(tgt):].tolist() != tgt:
                raise DataError(f"record {r.id}: target does not tokenise the same alone and after the prompt")
            labels[row, -len(tgt):] = ids[row, -len(tgt):]  # left padding: the target ends every row
        out["labels"] = labels
        if cut:
            out = truncate_rows(llm, out, cut)
    out["video_label"] = torch.tensor([r.video_label for r in records], dtype=torch.float32)
    out["text_label"] = torch.tensor([r.text_label for r in records], dtype=torch.float32)
    return {k: (v.to(llm.device) if torch.is_tensor(v) else v) for k, v in out.items()}


def _label_answers(tokenizer, ids: torch.Tensor, labels: torch.Tensor, tail: str, spans: list, rid: str) -> None:
    """Labels (in place) on the answers of a multi-turn row: `tail` (data.conversation_tail) ends the row; each of
    its tokens lying inside an answer span is supervised. (T,), (T,)"""
    enc = tokenizer(tail, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    if ids[-n:].tolist() != enc["input_ids"]:
        raise DataError(f"record {rid}: the conversation does not tokenise the same alone and after the prompt")
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        inside = [lo <= a and b <= hi for lo, hi in spans]
        if any(inside):
            labels[len(ids) - n + k] = ids[len(ids) - n + k]
        elif any(a < hi and lo < b for lo, hi in spans):  # a token across an answer's edge: no clean label
            raise DataError(f"record {rid}: a token crosses the edge of an answer; the turns cannot be supervised")


def _check_visual_alarm(llm, ids: torch.Tensor, records) -> None:
    vid = llm.tokenizer.convert_tokens_to_ids(VISUAL_ALARM)
    cfg = llm.model.config
    ok = {cfg.video_token_id, getattr(cfg, "image_token_id", None), getattr(cfg, "vision_end_token_id", None)}
    for row in range(ids.shape[0]):
        if records[row].video is None and not records[row].image:  # text-only row of a mixed batch: alarm ends text
            continue
        pos = (ids[row] == vid).nonzero()
        if len(pos) and int(ids[row, int(pos[-1]) - 1]) not in ok:
            raise DataError(f"record {records[row].id}: visual alarm is not right after the visual tokens")
