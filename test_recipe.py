"""--recipe authors gives the authors' value for every setting recipe.py lists; the default stays the paper's."""

import math
import os

import numpy as np
import pytest
import torch

import at_sft
import data
import grpo
import grpo_loss
import model
import recipe as RC
from alarm import TEXTUAL_ALARM, VISUAL_ALARM, at_sft_loss

# The authors' GRPO user text for a query, copied by hand from videollama3/train_grpo_vidlm3.py (QUESTION_TEMPLATE,
# then TYPE_TEMPLATE["free-form-and-choice"] with SAFE_LABEL = 0, HARMFUL_LABEL = 1): an independent copy, so an
# edit of recipe.py's strings fails here.
AUTHORS_TEXT = (
    "{q}\nPlease think about this question as if you were a human pondering deeply. Engage in an internal dialogue "
    "using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other "
    "natural language thought expressions It's encouraged to include self-reflection or verification in the "
    "reasoning process. Provide your detailed reasoning between the <think> </think> tags, and then give your final "
    "answer between the <answer> </answer> tags. First provide the response within <answer> </answer>. Then "
    "classify the video and text using 1 for harmful and 0 for safe within <vidType> </vidType> and <textType> "
    "</textType>, respectively."
)


@pytest.fixture(scope="module")
def vl3():
    return model.load_model("tiny-videollama3", device="cpu", dtype=torch.float32)


def test_authors_prompt_text_and_placement(vl3, demo_records):
    r = demo_records[0]
    proc = vl3.processor
    got = data.build_prompt(proc, r.query, has_video=True, structured=True, alarm=True, template="authors")
    user = AUTHORS_TEXT.format(q=r.query.strip())
    # no system instruction; the user turn: video, visual alarm, query + their templates, then the textual alarm
    assert data.STRUCTURED_INSTRUCTION not in got
    assert got.endswith(user + TEXTUAL_ALARM + "<|im_end|>\n<|im_start|>assistant\n")
    assert got.index(VISUAL_ALARM) < got.index(r.query) and got.count(TEXTUAL_ALARM) == 1
    # the default is the paper's: the instruction is the system turn, the textual alarm right after the query
    paper = data.build_prompt(proc, r.query, has_video=True, structured=True, alarm=True)
    assert "<|im_start|>system\n" + data.STRUCTURED_INSTRUCTION + "<|im_end|>" in paper
    assert r.query.strip() + TEXTUAL_ALARM + "<|im_end|>" in paper and "pondering" not in paper
    # the authors' stage 3 adds no instruction; their AT-SFT prompt is the plain one, as the paper's
    assert RC.prompt_kwargs("authors", "cold_start")["structured"] is False
    assert RC.prompt_kwargs("paper", "cold_start")["structured"] is True
    assert RC.prompt_kwargs("authors", "at_sft")["structured"] is False


def test_serving_template_follows_the_recipe(vl3, text_record, tmp_path):
    """The checkpoint's saved chat template writes the prompt it was trained with (recipe in its meta)."""
    proc = vl3.processor
    serve = data.serving_template(proc, structured=True, template="authors")
    for has_video, n_images in ((True, 0), (False, 1), (False, 0)):
        content = [{"type": "video"}] * has_video + [{"type": "image"}] * n_images
        msgs = [{"role": "user", "content": content + [{"type": "text", "text": text_record.query}]}]
        got = proc.apply_chat_template(msgs, chat_template=serve, tokenize=False, add_generation_prompt=True)
        want = data.build_prompt(proc, text_record.query, has_video=has_video, structured=True, alarm=True,
                                 n_images=n_images, template="authors")
        assert got == want
    out = str(tmp_path / "ckpt")
    model.save_checkpoint(vl3, out, meta={"stage": "grpo", "args": {"recipe": "authors"}})
    with open(os.path.join(out, model.TEMPLATE_FILE)) as f:
        assert f.read() == serve
    assert RC.of_checkpoint(model.checkpoint_meta(out)) == "authors"


def test_top_k_follows_the_recipe():
    assert grpo.parse_args([]).top_k == 0  # the paper: no top-k
    assert grpo.parse_args(["--recipe", "authors"]).top_k == 50  # transformers 4.46's default, kept by their config
    assert grpo.parse_args(["--recipe", "authors", "--top-k", "7"]).top_k == 7  # an explicit flag wins


def test_sampler_gets_the_recipes_top_k(vl3, demo_full, monkeypatch):
    """rollout_groups hands top-k 50 (and the authors' prompt) to the sampler under --recipe authors."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_sample(policy, prompts, G, **kw):
        seen.update(kw, ids=prompts[0]["input_ids"])
        raise Stop

    monkeypatch.setattr(grpo.rollout, "sample_groups", fake_sample)
    rec = data.load_records(os.path.join(demo_full, "grpo.jsonl"))[0]
    for flags, k in (([], 0), (["--recipe", "authors"], 50)):
        args = grpo.parse_args(flags)
        with pytest.raises(Stop):
            grpo.rollout_groups(vl3, None, [rec], [0], args, {})
        assert seen["top_k"] == k and seen["top_p"] == 0.95
        text = vl3.tokenizer.decode(seen["ids"][0])
        assert ("pondering deeply" in text) == (k == 50)


def test_authors_loss_normalisation_by_hand():
    """(Σ CE + λ1·BCE_v + λ2·BCE_t) / N_step, against the paper's token mean + λ·BCE, at logits 0 (BCE = ln 2)."""
    lm, n, n_step = torch.tensor(2.0), 10, 25  # token-mean CE 2.0 over 10 label tokens; 25 in the whole step
    z, y = torch.zeros(2), torch.tensor([1.0, 0.0])
    paper, _ = at_sft_loss(lm, z, z, y, y, 0.1, 0.1)
    authors, parts = at_sft_loss(lm, z, z, y, y, 0.1, 0.1, norm="step_sum", n_tokens=n, n_step=n_step)
    assert float(paper) == pytest.approx(2.0 + 0.2 * math.log(2), abs=1e-6)
    assert float(authors) == pytest.approx((20.0 + 0.2 * math.log(2)) / 25, abs=1e-6)  # ATC weight ≈ λ / N
    assert float(parts["lm"]) == 2.0
    assert RC.get("authors").sft_loss == "step_sum" and RC.get("paper").sft_loss == "mean"
    assert at_sft.get_args(["--recipe", "authors"]).two_phase  # their stages 1 and 2
    assert not at_sft.get_args([]).two_phase


def test_all_equal_group_float32_advantage():
    """Six rewards of 3.1: the paper's A = 0; the authors' float32 arithmetic leaves one ulp in the mean, so
    A = −ulp / (ulp·√(6/5) + 1e-4) ≈ −2.378e-3 for every completion."""
    parts = {"alpha": [0.1] * 6, "rouge": [1.0] * 6, "video": [1.0] * 6, "text": [1.0] * 6, "format": [1.0] * 6}
    r = grpo_loss.authors_rewards(parts, 1.0, 1.0)  # accuracy 2.1 + format 1.0, each float32, summed in float32
    assert r.dtype == torch.float32 and bool((r == np.float32(3.1)).all())
    assert torch.equal(grpo.group_advantages(r), torch.zeros(6))  # the default: the paper's
    ulp = float(np.spacing(np.float32(3.1)))  # 2.384e-7: the float32 mean is 3.1 + one ulp
    want = -ulp / (ulp * math.sqrt(6 / 5) + 1e-4)
    got = grpo.group_advantages(r, equal_groups="float32")
    assert torch.allclose(got, torch.full((6,), want), rtol=1e-4) and abs(want + 2.378e-3) < 1e-6


def test_authors_visual_budget(vl3, demo_records):
    """VideoLLaMA3: merge size 8 (GRPO) / 2 (SFT), frames resized to multiples of 14·merge within the token budget."""
    recs = demo_records[:1]
    base = data.collate(vl3, recs, structured=True, with_target=False)
    for stage, merge in (("grpo", 8), ("cold_start", 2)):
        b = data.collate(vl3, recs, with_target=False, **RC.prompt_kwargs("authors", stage))
        assert b["video_merge_sizes"].tolist() == [merge]
        t, h, w = b["video_grid_thw"][0].tolist()
        assert h % merge == 0 and w % merge == 0 and h // merge * (w // merge) >= RC.MIN_VISUAL_TOKENS
        assert t * (h // merge) * (w // merge) <= (5000 if stage == "grpo" else 5120)
    assert base["video_merge_sizes"].tolist() == [vl3.processor.video_processor.merge_size]  # paper: defaults
    qwen = model.load_model("tiny-qwen2.5-vl", device="cpu", dtype=torch.float32)
    assert data.visual_budget(qwen.processor, (8, 5000)) == {}  # merge is part of Qwen's model: not applied


def test_authors_truncation(vl3, text_record, capsys):
    """SFT rows cut at the limit (labels alike, said per record); the paper's default never cuts; a cut into the
    alarm tokens is refused."""
    full = data.collate(vl3, [text_record], structured=False, with_target=True)
    n = int(full["attention_mask"].sum())
    cut = n - 3
    b = data.collate(vl3, [text_record], structured=False, with_target=True, truncate=cut)
    assert b["input_ids"].shape[1] == cut and torch.equal(b["input_ids"][0], full["input_ids"][0, :cut])
    assert torch.equal(b["labels"][0], full["labels"][0, :cut])
    assert "truncated record text-only-1" in capsys.readouterr().err
    assert int((b["labels"] != -100).sum()) == int((full["labels"] != -100).sum()) - 3
    alarm_at = full["input_ids"][0].tolist().index(vl3.tokenizer.convert_tokens_to_ids(TEXTUAL_ALARM))
    with pytest.raises(data.DataError, match="alarm"):  # a cut just before the textual alarm
        data.collate(vl3, [text_record], structured=False, with_target=True, truncate=alarm_at)
    assert RC.prompt_kwargs("paper", "at_sft")["truncate"] == 0 and RC.prompt_kwargs("authors", "at_sft")["truncate"] == 8192
    assert RC.prompt_kwargs("authors", "grpo")["truncate"] == 0  # their GRPO prompt is not cut


def test_a_recipe_mismatch_is_said():
    meta = {"stage": "cold_start", "args": {"recipe": "paper"}}
    assert "trained with --recipe paper" in RC.check_start(meta, "authors", "GRPO")
    assert RC.check_start(meta, "paper", "GRPO") is None and RC.check_start({}, "authors", "GRPO") is None
    assert RC.of_checkpoint({"stage": "grpo", "args": {}}) == "paper"  # older checkpoints: the paper's
