r"""The VideoSafety-R1 reward with Dynamic Reward Adaptation (DRA): the GRPO signal.

A completion <think>..</think><answer>..</answer><vidType>0|1</vidType><textType>0|1</textType>
(1 = harmful, 0 = safe) is scored against a reference answer and the two ground-truth labels:

    r = r_format + α·r_ROUGE + γ_v·r_v + γ_t·r_t,    α = α_min + (1 − r_v·r_t)(α_max − α_min)

r_format is 1 for the four blocks in that order, else 0; r_ROUGE is the mean of the ROUGE-1,
ROUGE-2 and ROUGE-L F-measures (stemmer on) between predicted and reference <answer>; r_v, r_t are
1 when the predicted vidType / textType is the label.  DRA: with both labels right α is small and
the wording may drift from the reference; with either wrong α is large: stick to the reference.
Official values α_min = 0.1, α_max = 0.5, γ_v = γ_t = 1.0.  The quoted maximum 3.5 is the sum of
the per-term maxima; as α = α_max only when a label is wrong, the attainable maximum is 3.1.
Pure functions of plain strings (no torch); no completion string makes them raise.

Where we depart from the authors' code, and why:
- Tags are counted.  Their regex `<think>.*?</think>\s*<answer>.*?</answer>...` (fullmatch,
  DOTALL) accepts `<think>a</think><think>b</think><answer>..`: the lazy `.*?` swallows the extra
  block.  We require each of the eight tags exactly once.  We also allow whitespace around the
  whole completion (decoded text often ends with a newline); their fullmatch does not.
- Multilingual tokens.  rouge-score keeps only [a-z0-9], so an identical Chinese answer scores 0;
  VideoSafetyEval has 10 languages.  On ASCII text our tokens are rouge-score's (tested to 1e-9).
  Beyond ASCII: characters of scripts written without spaces (Han, kana, Hangul, Thai, Lao, Khmer,
  Myanmar) are one token each, with their combining marks; words of other scripts (Cyrillic,
  Arabic, Devanagari, ...) and accented Latin words stay whole and unstemmed ('café' stays 'café';
  rouge-score cuts it to 'caf').  Text is NFKC-normalised first, so full-width 'ＡＩ' reads 'ai'.
- A reference without <answer> tags is used whole (theirs extracts '' and scores 0).
- ROUGE reads at most MAX_ROUGE_TOKENS tokens per side so a runaway string cannot stall training;
  a 768-token completion never gets near it.
"""
import functools
import itertools
import operator
import re
import unicodedata
from collections import Counter

TAGS = ("think", "answer", "vidType", "textType")
PARTS = ("format", "rouge", "video", "text", "alpha")
ALPHA_MIN, ALPHA_MAX, GAMMA_V, GAMMA_T = 0.1, 0.5, 1.0, 1.0  # official values
MAX_ROUGE_TOKENS = 10_000

# -----------------------------------------------------------------------------
# Parsing and r_format. Only str.find / str.count: linear time on any input, no regex backtracking.


def parse_structured(text):
    """{tag: stripped content of the FIRST <tag>...</tag>, or None if missing or unclosed}."""
    text = text or ""
    out = {}
    for tag in TAGS:
        open_, close = f"<{tag}>", f"</{tag}>"
        start = text.find(open_)
        end = text.find(close, start + len(open_)) if start >= 0 else -1
        out[tag] = text[start + len(open_):end].strip() if end >= 0 else None
    return out


_SPACES = re.compile(r"\s*")


def format_reward(text):
    """1.0 iff text is <think>..</think> <answer>..</answer> <vidType>..</vidType> <textType>..</textType>,
    each tag exactly once, only whitespace between the blocks and around them; else 0.0."""
    text = (text or "").strip()
    if any(text.count(f"<{t}>") != 1 or text.count(f"</{t}>") != 1 for t in TAGS):
        return 0.0  # a second <think> block etc.: the authors' regex alone would let it through
    pos = 0
    for tag in TAGS:
        open_, close = f"<{tag}>", f"</{tag}>"
        pos = _SPACES.match(text, pos).end()  # whitespace between blocks is fine
        if not text.startswith(open_, pos):
            return 0.0  # wrong order, or text outside the blocks
        end = text.find(close, pos)
        if end < 0:
            return 0.0  # the closing tag came before the opening one
        pos = end + len(close)
    return 1.0 if pos == len(text) else 0.0  # nothing after </textType>


# -----------------------------------------------------------------------------
# r_ROUGE: rouge-score's tokens on ASCII text, plus sensible tokens for the other scripts.

# Scripts written without spaces between words: one token per character, the usual choice for
# Chinese / Japanese ROUGE. Hangul too: Korean particles fuse onto words, so whole words rarely match.
_NO_SPACE = [(0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1100, 0x11FF),  # Thai + Lao, Myanmar, Hangul jamo
             (0x1780, 0x17FF), (0x2E80, 0x2FDF), (0x3040, 0x31FF),  # Khmer, CJK radicals, kana + bopomofo
             (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),  # Han
             (0xAC00, 0xD7AF), (0x20000, 0x323AF)]  # Hangul syllables, Han extensions B-H
_NO_SPACE_CLASS = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _NO_SPACE)
# Combining marks (Devanagari vowel signs, Arabic harakat, Thai tone marks, accents) belong to the
# letter before them, but Python's \w leaves them out, so we list them (~2k characters, built in ~15 ms).
_MARKS = "".join(chr(c) for c in range(0x300, 0x20000) if unicodedata.category(chr(c))[0] == "M")
# A token is one no-space character with its marks, or a run of letters/digits/marks (no underscore)
# outside those scripts. On ASCII text that is exactly rouge-score's `[a-z0-9]+` runs after lower-casing.
_TOKEN = re.compile(f"[{_NO_SPACE_CLASS}][{_MARKS}]*|(?:[^\\W_{_NO_SPACE_CLASS}]|[{_MARKS}])+")


@functools.cache
def _porter():
    from nltk.stem import porter  # what rouge-score uses; imported lazily because nltk takes ~0.7 s
    return porter.PorterStemmer()


@functools.lru_cache(maxsize=1 << 16)
def _stem(word):
    return _porter().stem(word) if len(word) > 3 else word  # rouge-score stems only words longer than 3


def rouge_tokens(text):
    """Tokens for ROUGE: identical to rouge-score's (use_stemmer=True) on ASCII text."""
    if not text:
        return []
    text = unicodedata.normalize("NFKC", text).lower()
    tokens = (m.group() for m in itertools.islice(_TOKEN.finditer(text), MAX_ROUGE_TOKENS))
    return [_stem(t) if t.isascii() else t for t in tokens]  # Porter is for English words only


def _lcs_length(a, b):
    """Longest common subsequence length, bit-parallel (Allison & Dix 1986; Hyyrö 2004). Exact, like
    the usual DP, whose row L[i] = LCS(a[:i], b read so far) v stores as steps: bit i is 0 where
    L[i+1] = L[i] + 1, so LCS = L[len(a)] = the number of 0 bits. 64 DP cells per machine word."""
    if len(a) < len(b):
        a, b = b, a  # bits over the longer list, loop over the shorter
    wanted, match = set(b), {}
    for i, tok in enumerate(a):
        if tok in wanted:
            match[tok] = match.get(tok, 0) | (1 << i)  # bit i set where a[i] == tok
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _f_measure(overlap, n_pred, n_ref):
    p, r = overlap / max(n_pred, 1), overlap / max(n_ref, 1)  # same arithmetic as rouge-score
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _rouge_from_tokens(pred, ref):
    def ngrams(tokens, n):
        return Counter(zip(*(tokens[i:] for i in range(n))))

    f = []
    for n in (1, 2):  # ROUGE-N: clipped n-gram overlap
        p, r = ngrams(pred, n), ngrams(ref, n)
        f.append(_f_measure(sum((p & r).values()), sum(p.values()), sum(r.values())))
    f.append(_f_measure(_lcs_length(pred, ref), len(pred), len(ref)))  # ROUGE-L
    return (f[0] + f[1] + f[2]) / 3  # r_ROUGE = (F_R1 + F_R2 + F_RL) / 3


def rouge_reward(pred_answer, ref_answer):
    """r_ROUGE in [0, 1] between two answer texts; a missing (None) or empty answer gives 0."""
    return _rouge_from_tokens(rouge_tokens(pred_answer), rouge_tokens(ref_answer))


# -----------------------------------------------------------------------------
# r_v, r_t and Dynamic Reward Adaptation.


def _label_str(label):
    """A ground-truth label as '0' or '1'. A bad label is a data bug, so it raises."""
    if isinstance(label, str):
        s = label.strip()
    else:
        try:
            s = str(operator.index(label))  # int, bool, numpy int, integer 0-d tensor
        except TypeError:
            s = None
    if s not in ("0", "1"):
        raise ValueError(f"safety label must be 0/1 or '0'/'1' (1 = harmful), got {label!r}")
    return s


def label_reward(pred_tag, label):
    """r_v or r_t: 1.0 iff the predicted tag content, stripped, is the label; anything else is 0."""
    label = _label_str(label)  # checked even when the tag is missing: a bad label must not pass silently
    return 1.0 if isinstance(pred_tag, str) and pred_tag.strip() == label else 0.0


def dra_alpha(r_v, r_t, alpha_min=ALPHA_MIN, alpha_max=ALPHA_MAX):
    """α = α_min + (1 − r_v·r_t)(α_max − α_min): α_min when both labels are right, else α_max."""
    return alpha_min + (1 - r_v * r_t) * (alpha_max - alpha_min)


# -----------------------------------------------------------------------------
# The total, for one completion and for a group.


@functools.lru_cache(maxsize=4096)
def _reference_tokens(reference):
    """Cached: a GRPO group scores G completions against the same reference."""
    answer = parse_structured(reference)["answer"]
    return tuple(rouge_tokens(reference if answer is None else answer))  # no tags: use it whole


def safety_reward(completion, reference, video_label, text_label, *,
                  alpha_min=ALPHA_MIN, alpha_max=ALPHA_MAX, gamma_v=GAMMA_V, gamma_t=GAMMA_T):
    """(total, parts) for one completion; parts = {format, rouge, video, text, alpha}.

        r = r_format + α·r_ROUGE + γ_v·r_v + γ_t·r_t,   α = α_min + (1 − r_v·r_t)(α_max − α_min)

    reference: the reference completion (its <answer> is used) or the bare answer text.
    video_label, text_label: 1 = harmful, 0 = safe, as int or '0'/'1'."""
    pred = parse_structured(completion)
    r_format = format_reward(completion)
    r_rouge = _rouge_from_tokens(rouge_tokens(pred["answer"]), _reference_tokens(reference))
    r_v = label_reward(pred["vidType"], video_label)
    r_t = label_reward(pred["textType"], text_label)
    alpha = dra_alpha(r_v, r_t, alpha_min, alpha_max)  # α = α_min + (1 − r_v·r_t)(α_max − α_min)
    # r = r_format + α·r_ROUGE + γ_v·r_v + γ_t·r_t
    total = r_format + alpha * r_rouge + gamma_v * r_v + gamma_t * r_t
    return total, {"format": r_format, "rouge": r_rouge, "video": r_v, "text": r_t, "alpha": alpha}


def reward_weights(config=None):
    """The DRA weights {alpha_min, alpha_max, gamma_v, gamma_t} of a run's config (e.g. grpo.py's flags, as
    saved in its checkpoint), the official values for any weight it does not set."""
    config = config or {}
    defaults = {"alpha_min": ALPHA_MIN, "alpha_max": ALPHA_MAX, "gamma_v": GAMMA_V, "gamma_t": GAMMA_T}
    return {k: float(config.get(k, v)) for k, v in defaults.items()}


def safety_rewards(completions, references, video_labels, text_labels, *,
                   alpha_min=ALPHA_MIN, alpha_max=ALPHA_MAX, gamma_v=GAMMA_V, gamma_t=GAMMA_T):
    """safety_reward over a batch (e.g. GRPO groups): (totals, {part: [values]}) for the loss and logs."""
    n = len(completions)
    if not len(references) == len(video_labels) == len(text_labels) == n:
        raise ValueError(f"safety_rewards: {n} completions, {len(references)} references, {len(video_labels)} "
                         f"video labels and {len(text_labels)} text labels; pass one of each per completion")
    weights = dict(alpha_min=alpha_min, alpha_max=alpha_max, gamma_v=gamma_v, gamma_t=gamma_t)
    items = zip(completions, references, video_labels, text_labels)
    results = [safety_reward(*item, **weights) for item in items]
    return [total for total, _ in results], {k: [parts[k] for _, parts in results] for k in PARTS}
