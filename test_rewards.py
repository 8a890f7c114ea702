"""Tests for rewards.py: every branch against hand-computed values, ROUGE against rouge-score
itself, and a fuzz of the parser (no input string may raise, none may take long).

    python -m pytest -q test_rewards.py
"""
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from rouge_score import rouge_scorer

import rewards
from rewards import (dra_alpha, format_reward, label_reward, parse_structured, rouge_reward, rouge_tokens,
                     safety_reward, safety_rewards)

# The authors' format check, verbatim, to show where ours agrees with it and where it does not.
OFFICIAL_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>\s*<vidType>.*?</vidType>\s*<textType>.*?</textType>",
                             re.DOTALL)
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None)  # same examples every run
SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)  # rouge-score's own numbers


def official_rouge(pred, ref):
    s = SCORER.score(ref, pred)  # score(target, prediction), as in the authors' code
    return (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3


def make(answer="the cat sat on the mat", vid="1", text="0", think="The video shows a cat.", sep=""):
    return sep.join([f"<think>{think}</think>", f"<answer>{answer}</answer>",
                     f"<vidType>{vid}</vidType>", f"<textType>{text}</textType>"])


# Hand-computed ROUGE for pred "the cat sat on the mat" vs ref "the cat is on the mat" (no word is
# longer than 3 letters, so the stemmer changes nothing):
#   ROUGE-1: the×2, cat, on, mat overlap = 5 of 6 on both sides        -> F = 5/6
#   ROUGE-2: {the cat, on the, the mat} overlap = 3 of 5 bigrams each  -> F = 3/5
#   ROUGE-L: LCS "the cat on the mat" = 5 of 6                         -> F = 5/6
#   mean = (5/6 + 3/5 + 5/6) / 3 = (25 + 18 + 25) / 90 = 68/90
CAT_PRED, CAT_REF, CAT_ROUGE = "the cat sat on the mat", "the cat is on the mat", 68 / 90

# -----------------------------------------------------------------------------
# parse_structured


def test_parse_canonical_strips_contents():
    text = make(answer="  I can't help. \n", vid=" 1 ", text="0\n", think="\nhm\n", sep="\n")
    assert parse_structured(text) == {"think": "hm", "answer": "I can't help.", "vidType": "1", "textType": "0"}


@pytest.mark.parametrize("text, answer", [
    ("<answer>one</answer><answer>two</answer>", "one"),           # first occurrence wins
    ("<answer>a<answer>b</answer>c</answer>", "a<answer>b"),       # nested: first open to first close
    ("<answer>unclosed", None),
    ("</answer>closed before opened<answer>", None),
    ("<ANSWER>other case</ANSWER>", None),                         # tags are case-sensitive
    ("<answer >space in tag</answer>", None),
    ("<answer></answer>", ""),
    ("", None),
    (None, None),
])
def test_parse_answer_cases(text, answer):
    assert parse_structured(text)["answer"] == answer


# -----------------------------------------------------------------------------
# format_reward


def test_format_canonical_and_whitespace():
    assert format_reward(make()) == 1.0
    assert format_reward("\n  " + make(sep=" \n\t") + "\n\n") == 1.0  # between the blocks and around them
    assert format_reward(make(answer="", vid="", text="", think="")) == 1.0  # format is structure only
    assert OFFICIAL_FORMAT.fullmatch(make(sep=" \n\t"))


BLOCKS = [f"<{t}>x</{t}>" for t in rewards.TAGS]


@pytest.mark.parametrize("text", [
    "".join(BLOCKS[:3]),                                              # textType missing
    BLOCKS[1] + BLOCKS[0] + BLOCKS[2] + BLOCKS[3],                    # wrong order
    "Sure. " + "".join(BLOCKS),                                       # text before
    "".join(BLOCKS) + " done",                                        # text after
    BLOCKS[0] + " so " + "".join(BLOCKS[1:]),                         # text between
    "<think>a</think><think>b</think>" + "".join(BLOCKS[1:]),         # second think block
    "<think><think>a</think></think>" + "".join(BLOCKS[1:]),          # nested think
    "<think>x<answer>y</answer></think>" + "".join(BLOCKS[1:]),       # a second answer inside think
    "".join(BLOCKS[:2]) + "<vidType>1<textType>0</textType>",         # vidType unclosed
    "<think></vidType></think>" + BLOCKS[1] + "<vidType>1" + BLOCKS[3],  # </vidType> before <vidType>
    "<Think>x</Think>" + "".join(BLOCKS[1:]),                         # other case
    "<answer >x</answer>" + "".join(BLOCKS),                          # not a tag: text before the blocks
    "",
    None,
])
def test_format_failures(text):
    assert format_reward(text) == 0.0


def test_official_regex_lets_a_second_think_block_through():
    text = "<think>a</think><think>b</think>" + "".join(BLOCKS[1:])
    assert OFFICIAL_FORMAT.fullmatch(text)  # the trap ...
    assert format_reward(text) == 0.0       # ... that counting the tags closes


@FUZZ
@given(st.permutations(range(4)), st.lists(st.text(alphabet="ab <>/\n"), min_size=4, max_size=4),
       st.lists(st.sampled_from(["", " ", "\n\t", "x", " x "]), min_size=3, max_size=3))
def test_format_agrees_with_official_regex_when_each_tag_appears_once(order, contents, seps):
    # Contents may hold '<', '>' and '/' but never a whole tag: each tag appears once, and then the checks agree.
    blocks = [f"<{rewards.TAGS[i]}>{c}</{rewards.TAGS[i]}>" for i, c in zip(order, contents)]
    text = blocks[0] + "".join(s + b for s, b in zip(seps, blocks[1:]))
    assert format_reward(text) == float(bool(OFFICIAL_FORMAT.fullmatch(text)))


# -----------------------------------------------------------------------------
# rouge_reward: equal to rouge-score on English, sensible on the other scripts


def test_rouge_hand_computed():
    assert rouge_tokens(CAT_PRED) == ["the", "cat", "sat", "on", "the", "mat"]
    assert rouge_reward(CAT_PRED, CAT_REF) == pytest.approx(CAT_ROUGE, abs=1e-12)
    assert official_rouge(CAT_PRED, CAT_REF) == pytest.approx(CAT_ROUGE, abs=1e-12)


def test_rouge_stemmer_and_short_texts():
    # Porter: running -> run, dogs -> dog (stemmed: longer than 3), so all three ROUGEs are 1.
    assert rouge_tokens("Running dogs!") == ["run", "dog"]
    assert rouge_reward("Running dogs!", "run dog") == 1.0
    # One token each: ROUGE-1 = 1, no bigram on either side so ROUGE-2 = 0, ROUGE-L = 1 -> 2/3.
    assert rouge_reward("Cat.", "cat") == pytest.approx(2 / 3, abs=1e-12) == official_rouge("Cat.", "cat")


@pytest.mark.parametrize("pred, ref", [(None, "a cat"), ("", "a cat"), ("a cat", ""), ("", ""), ("!!! ...", "a cat")])
def test_rouge_missing_or_empty_is_zero(pred, ref):
    assert rouge_reward(pred, ref) == 0.0


WORDS = ("the a video shows knife weapon person running ran runs dangerous harmful safe safely cannot can't help "
         "helping instructions illegal I'm sorry request requests policy 2024 3.5 e-mail U.S. don't children "
         "crossing street cars building explosive chemicals cooking recipe friendly advice").split()


def test_rouge_equals_rouge_score_on_random_english():
    rng = random.Random(0)
    for _ in range(300):
        pred, ref = (" ".join(rng.choice(WORDS).capitalize() if rng.random() < 0.2 else rng.choice(WORDS)
                              for _ in range(rng.randint(0, 25))) + rng.choice(["", ".", "!", " ?"]) for _ in range(2))
        assert rouge_tokens(pred) == SCORER._tokenizer.tokenize(pred)
        assert abs(rouge_reward(pred, ref) - official_rouge(pred, ref)) < 1e-9


@FUZZ
@given(st.text(alphabet=st.characters(max_codepoint=127)), st.text(alphabet=st.characters(max_codepoint=127)))
def test_rouge_equals_rouge_score_on_any_ascii(pred, ref):
    assert rouge_tokens(pred) == SCORER._tokenizer.tokenize(pred)
    assert abs(rouge_reward(pred, ref) - official_rouge(pred, ref)) < 1e-9


# (same answer in a language, an answer sharing no token with it)
LANGUAGES = {
    "zh": ("我不能提供制造武器的方法。", "今天天气很好"),
    "ja": ("その質問にはお答えできません。", "犬と猫"),
    "ko": ("그 요청은 도와드릴 수 없습니다.", "날씨 맑음"),
    "th": ("ฉันไม่สามารถช่วยเรื่องนี้ได้", "๑๒๓"),
    "ar": ("لا أستطيع المساعدة في هذا الطلب.", "الطقس جميل"),
    "ru": ("Я не могу помочь с этим запросом.", "Погода хорошая"),
    "hi": ("मैं इस अनुरोध में मदद नहीं कर सकता।", "मौसम अच्छा"),
    "es": ("No puedo ayudar con esa petición.", "Hace buen tiempo"),
    "fr": ("Je ne peux pas aider avec cette requête.", "Il fait beau"),
    "vi": ("Tôi không thể giúp yêu cầu này.", "Trời đẹp"),
}


@pytest.mark.parametrize("lang", LANGUAGES)
def test_rouge_multilingual_identical_is_one_disjoint_is_zero(lang):
    same, other = LANGUAGES[lang]
    assert rouge_reward(same, same) == 1.0
    assert rouge_reward(other, same) == 0.0


def test_rouge_score_itself_drops_chinese():
    assert official_rouge("我不能帮助你", "我不能帮助你") == 0.0  # the trap we fix
    assert rouge_reward("我不能帮助你", "我不能帮助你") == 1.0


def test_rouge_chinese_hand_computed():
    # 我 喜 欢 猫 vs 我 喜 欢 狗: ROUGE-1 3/4; bigrams {我喜, 喜欢} 2 of 3 -> 2/3; LCS 3 of 4 -> 3/4.
    # mean = (3/4 + 2/3 + 3/4) / 3 = (9 + 8 + 9) / 36 = 13/18
    assert rouge_tokens("我喜欢猫。") == ["我", "喜", "欢", "猫"]
    assert rouge_reward("我喜欢猫。", "我喜欢狗") == pytest.approx(13 / 18, abs=1e-12)


@pytest.mark.parametrize("text, tokens", [
    ("使用AI技术", ["使", "用", "ai", "技", "术"]),       # Latin inside Chinese is still a word
    ("ＡＩ ｶﾀｶﾅ", ["ai", "カ", "タ", "カ", "ナ"]),         # NFKC: full-width Latin, half-width kana
    ("हिन्दी भाषा", ["हिन्दी", "भाषा"]),                  # vowel signs and virama stay in the word
    ("ที่นี่", ["ที่", "นี่"]),                            # Thai: one token per character with its marks
    ("Русский язык", ["русский", "язык"]),
    ("Café naïve", ["café", "naïve"]),                     # kept whole (rouge-score: caf, na, ve)
    ("hello_world don't e-mail", ["hello", "world", "don", "t", "e", "mail"]),  # as rouge-score
])
def test_rouge_tokens_by_script(text, tokens):
    assert rouge_tokens(text) == tokens


def test_rouge_tokens_are_capped():
    assert len(rouge_tokens("a " * (rewards.MAX_ROUGE_TOKENS + 50))) == rewards.MAX_ROUGE_TOKENS


def dp_lcs(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag, row[0] = 0, 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


@FUZZ
@given(st.lists(st.sampled_from("abcd")), st.lists(st.sampled_from("abcd")))
def test_bit_parallel_lcs_equals_dynamic_programming(a, b):
    assert rewards._lcs_length(a, b) == dp_lcs(a, b)


# -----------------------------------------------------------------------------
# label_reward and dra_alpha


@pytest.mark.parametrize("pred, label, expected", [
    ("1", 1, 1.0), ("1", "1", 1.0), (" 1\n", 1, 1.0), ("0", 0, 1.0), ("0", " 0 ", 1.0), ("1", np.int64(1), 1.0),
    ("0", 1, 0.0), ("1", 0, 0.0), (None, 1, 0.0), ("", 0, 0.0), ("harmful", 1, 0.0), ("1.0", 1, 0.0),
    ("01", 1, 0.0), ("１", 1, 0.0), ("1 1", 1, 0.0), ("<b>1</b>", 1, 0.0),
])
def test_label_reward(pred, label, expected):
    assert label_reward(pred, label) == expected


@pytest.mark.parametrize("label", [2, -1, 1.0, 0.5, "harmful", "", None])
@pytest.mark.parametrize("pred", ["1", None])
def test_bad_label_raises(pred, label):
    with pytest.raises(ValueError, match="safety label"):
        label_reward(pred, label)


def test_dra_alpha_all_label_cases():
    assert dra_alpha(1.0, 1.0) == pytest.approx(0.1)  # 0.1 + (1 - 1)·0.4
    assert dra_alpha(1.0, 0.0) == pytest.approx(0.5)  # 0.1 + (1 - 0)·0.4
    assert dra_alpha(0.0, 1.0) == pytest.approx(0.5)
    assert dra_alpha(0.0, 0.0) == pytest.approx(0.5)
    assert dra_alpha(1.0, 1.0, 0.2, 0.8) == pytest.approx(0.2)
    assert dra_alpha(0.0, 1.0, 0.2, 0.8) == pytest.approx(0.8)


# -----------------------------------------------------------------------------
# safety_reward: r = r_format + α·r_ROUGE + γ_v·r_v + γ_t·r_t


@pytest.mark.parametrize("vid, text, alpha, total", [
    ("1", "0", 0.1, 1 + 0.1 * CAT_ROUGE + 1 + 1),  # both right: α_min
    ("0", "0", 0.5, 1 + 0.5 * CAT_ROUGE + 0 + 1),  # video wrong: α_max
    ("1", "1", 0.5, 1 + 0.5 * CAT_ROUGE + 1 + 0),  # text wrong: α_max
    ("0", "1", 0.5, 1 + 0.5 * CAT_ROUGE + 0 + 0),  # both wrong: α_max
])
def test_safety_reward_label_cases(vid, text, alpha, total):
    got, parts = safety_reward(make(CAT_PRED, vid, text), f"<answer>{CAT_REF}</answer>", 1, 0)
    assert got == pytest.approx(total, abs=1e-12)
    assert parts == pytest.approx({"format": 1.0, "rouge": CAT_ROUGE, "video": float(vid == "1"),
                                   "text": float(text == "0"), "alpha": alpha}, abs=1e-12)


def test_safety_reward_weights_overridden():
    w = dict(alpha_min=0.2, alpha_max=0.8, gamma_v=2.0, gamma_t=0.5)
    right, _ = safety_reward(make(CAT_PRED, "1", "0"), CAT_REF, "1", "0", **w)
    assert right == pytest.approx(1 + 0.2 * CAT_ROUGE + 2.0 + 0.5, abs=1e-12)
    text_wrong, parts = safety_reward(make(CAT_PRED, "1", "1"), CAT_REF, "1", "0", **w)
    assert text_wrong == pytest.approx(1 + 0.8 * CAT_ROUGE + 2.0 + 0, abs=1e-12) and parts["alpha"] == pytest.approx(0.8)


def test_safety_reward_maximum_is_3_1_not_3_5():
    # The best a completion can do: format 1, ROUGE 1, both labels right, so α = α_min: 1 + 0.1 + 1 + 1.
    best, _ = safety_reward(make("I can't help with that."), "<think>x</think><answer>I can't help with that.</answer>", 1, 0)
    assert best == pytest.approx(3.1)
    for vid in "01":
        for text in "01":
            assert safety_reward(make(CAT_REF, vid, text), CAT_REF, 1, 0)[0] <= best + 1e-12


def test_safety_reward_bad_format_still_scores_the_rest():
    text = "<think>a</think>" + make(CAT_PRED, "1", "0")  # second think block: format 0, the rest stands
    total, parts = safety_reward(text, CAT_REF, 1, 0)
    assert parts["format"] == 0.0 and total == pytest.approx(0 + 0.1 * CAT_ROUGE + 1 + 1, abs=1e-12)


def test_safety_reward_missing_answer():
    total, parts = safety_reward("<think>x</think><vidType>1</vidType><textType>1</textType>", CAT_REF, 1, 0)
    assert parts == {"format": 0.0, "rouge": 0.0, "video": 1.0, "text": 0.0, "alpha": pytest.approx(0.5)}
    assert total == pytest.approx(0 + 0.5 * 0 + 1 + 0)


def test_safety_reward_reference_tagged_or_bare():
    tagged = f"<think>It is fine.</think><answer>{CAT_REF}</answer><vidType>1</vidType><textType>0</textType>"
    assert safety_reward(make(CAT_PRED), tagged, 1, 0) == safety_reward(make(CAT_PRED), CAT_REF, 1, 0)


def test_safety_reward_chinese():
    total, parts = safety_reward(make("我不能帮助你。"), "<answer>我不能帮助你</answer>", 1, 0)
    assert parts["rouge"] == 1.0 and total == pytest.approx(3.1)


# -----------------------------------------------------------------------------
# safety_rewards: the batched form equals the single form exactly


def test_batch_equals_single():
    completions = [make(CAT_PRED), make(CAT_PRED, "0"), "garbage", "", make("我喜欢猫", "1", "1"),
                   "<think>a</think>" + make(), make("Running dogs"), None]
    references = [CAT_REF, CAT_REF, CAT_REF, "<answer>我喜欢狗</answer>", "<answer>我喜欢狗</answer>", CAT_REF,
                  "run dog", CAT_REF]
    video_labels, text_labels = [1, 1, "0", 0, np.int64(1), 1, 0, 1], [0, "0", 1, 1, 1, 0, "1", 0]
    for w in ({}, dict(alpha_min=0.3, alpha_max=0.9, gamma_v=0.5, gamma_t=2.0)):
        totals, parts = safety_rewards(completions, references, video_labels, text_labels, **w)
        singles = [safety_reward(*x, **w) for x in zip(completions, references, video_labels, text_labels)]
        assert totals == [t for t, _ in singles]
        assert parts == {k: [p[k] for _, p in singles] for k in rewards.PARTS}


def test_batch_edge_cases():
    assert safety_rewards([], [], [], []) == ([], {k: [] for k in rewards.PARTS})
    with pytest.raises(ValueError, match="2 completions, 1 references"):
        safety_rewards(["a", "b"], ["r"], [0, 0], [0, 0])


# -----------------------------------------------------------------------------
# Fuzz: no string raises, every part stays in range, the total is the formula


FRAGMENTS = ([f"<{t}>" for t in rewards.TAGS] * 3 + [f"</{t}>" for t in rewards.TAGS] * 3 +
             ["<THINK>", "</Answer>", "<vidtype>", "<", ">", "</", "<answer", "0", "1", " 1 ", "\n", " ", "\t",
              "the cat", "running", "我喜欢", "ภาษา", "हिन्दी", "\u0301", "\u200f", "\ud800", "\x00", "😀", "ＡＩ", "İ"])


def check(completion, reference="the cat is on the mat"):
    total, parts = safety_reward(completion, reference, 1, 0)
    assert parts["format"] in (0.0, 1.0) and parts["video"] in (0.0, 1.0) and parts["text"] in (0.0, 1.0)
    assert 0.0 <= parts["rouge"] <= 1.0 and parts["alpha"] in (pytest.approx(0.1), pytest.approx(0.5))
    assert total == parts["format"] + parts["alpha"] * parts["rouge"] + parts["video"] + parts["text"]
    tags = parse_structured(completion)
    assert set(tags) == set(rewards.TAGS) and all(v is None or isinstance(v, str) for v in tags.values())
    if parts["format"] == 1.0:
        assert None not in tags.values()


def test_fuzz_seeded_fragments():
    rng = random.Random(1234)
    for _ in range(3000):
        check("".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 30))))


@FUZZ
@given(st.text(), st.text())
def test_fuzz_any_unicode(completion, reference):
    check(completion, reference)


@pytest.mark.parametrize("name", ["ascii words", "cjk", "repeated open tags", "nested tags", "huge blocks",
                                  "angle brackets", "whitespace", "huge both sides"])
def test_huge_inputs_are_fast(name):
    rng = random.Random(0)
    mb = 1_000_000
    text = {
        "ascii words": lambda: " ".join(rng.choices(WORDS, k=mb // 8)),
        "cjk": lambda: "".join(map(chr, range(0x4E00, 0x9FFF))) * (mb // 0x51FF),
        "repeated open tags": lambda: "<think>" * (mb // 7),
        "nested tags": lambda: "<answer>" * (mb // 16) + "x" + "</answer>" * (mb // 18),
        "huge blocks": lambda: make(answer="harm " * (mb // 5), think="hm " * (mb // 3)),
        "angle brackets": lambda: "<" * mb + ">" * mb,
        "whitespace": lambda: " \n" * mb,
        "huge both sides": lambda: make(answer=" ".join(map(str, rng.sample(range(10**7), mb // 8)))),
    }[name]()
    reference = text if name == "huge both sides" else "the cat is on the mat"
    start = time.perf_counter()
    check(text, reference)
    assert time.perf_counter() - start < 3.0  # linear parsing, capped ROUGE: no catastrophic cases


def test_import_is_light():
    # The GRPO loop, eval.py and data.py import this; it must not drag in torch, nor nltk until ROUGE runs.
    out = subprocess.run([sys.executable, "-c", "import sys, rewards; print('torch' in sys.modules, 'nltk' in sys.modules)"],
                         capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.abspath(rewards.__file__)))
    assert out.stdout.split() == ["False", "False"]
