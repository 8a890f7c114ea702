"""recipe.py: the paper's recipe (the default) and the authors' code's (`--recipe authors`), in one table.

Every setting where the authors' code (Emiya-syw/VideoSafety-R1, HEAD 7589dea) differs from the paper's text is a
field of `Recipe`; the stages read their settings from here and nowhere else. The README's departures section lists
the same differences.

| setting                     | paper (default)                                  | authors (their code)                          |
|-----------------------------|--------------------------------------------------|-----------------------------------------------|
| structured prompt (GRPO, eval) | STRUCTURED_INSTRUCTION as the system turn; the  | no system turn; the user turn is the video, then |
|                             | textual alarm right after the query              | QUESTION_TEMPLATE(query) + TYPE_TEMPLATE; the    |
|                             |                                                  | textual alarm after that instruction          |
| cold-start prompt           | the same as GRPO's                               | the record's query as written (their stage 3  |
|                             |                                                  | adds no instruction: train.py)                |
| GRPO sampling               | temperature 1, top-p 0.95                        | the same after top-k 50 (transformers 4.46's  |
|                             |                                                  | default, which GenerationConfig keeps)        |
| SFT loss scale              | token-mean CE + λ·BCE per micro-batch, / accum   | (Σ token CE + λ·BCE) / the step's label count |
| visual budget, stages 1-3   | the processor's defaults                         | merge 2, at most 5120 visual tokens           |
| visual budget, GRPO         | the processor's defaults                         | merge 8, at most 5000 visual tokens           |
| too long a row (SFT)        | an error (data.collate), never cut               | cut at 8192 tokens (their collator), loudly   |
| all-equal reward group      | A = 0                                            | (r − mean)/(std + 1e-4) in float32 (≈ 2e-3)   |
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

RECIPES = ("paper", "authors")

# The authors' GRPO prompt (videollama3/train_grpo_vidlm3.py), verbatim: QUESTION_TEMPLATE, then the TYPE_TEMPLATE
# of the safety data's problem_type "free-form-and-choice" (their README: the one for the safety reward), with their
# SAFE_LABEL = 0 and HARMFUL_LABEL = 1 filled in. (The missing full stop after "thought expressions" is theirs.)
QUESTION_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer between "
    "the <answer> </answer> tags."
)
TYPE_TEMPLATE = (
    " First provide the response within <answer> </answer>. Then classify the video and text using 1 for harmful "
    "and 0 for safe within <vidType> </vidType> and <textType> </textType>, respectively."
)
MIN_VISUAL_TOKENS = 4 * 4  # the authors' image processor's min_tokens (videollama3_encoder), kept with their budget


@dataclass(frozen=True)
class Recipe:
    name: str
    template: str  # "paper": the instruction is the system turn; "authors": their templates after the query
    cold_start_instruction: bool  # do cold start's prompts carry the instruction (paper) or the query only (authors)
    top_k: int  # GRPO sampling: the k most likely tokens before top-p (0 = off)
    sft_loss: str  # "mean": token-mean CE per micro-batch (paper); "step_sum": Σ CE + λ·BCE over the step's labels
    equal_groups: str  # all-equal rewards: "zero" (A = 0) or "float32" (the authors' arithmetic, as it comes out)
    sft_visual: tuple[int, int] | None  # stages 1-3: (merge size, most visual tokens) or None = processor defaults
    grpo_visual: tuple[int, int] | None  # stage 4 (and eval of its checkpoints), the same
    sft_truncate: int  # stages 1-3: cut longer rows to this many tokens (0 = never: a too-long row is an error)


PAPER = Recipe("paper", template="paper", cold_start_instruction=True, top_k=0, sft_loss="mean", equal_groups="zero",
               sft_visual=None, grpo_visual=None, sft_truncate=0)
AUTHORS = Recipe("authors", template="authors", cold_start_instruction=False, top_k=50, sft_loss="step_sum",
                 equal_groups="float32", sft_visual=(2, 5120), grpo_visual=(8, 5000), sft_truncate=8192)


def get(name: str | None) -> Recipe:
    """The recipe called `name` (None: the paper's)."""
    if name in (None, "paper"):
        return PAPER
    if name == "authors":
        return AUTHORS
    raise ValueError(f"unknown recipe {name!r}; expected one of {RECIPES}")


def add_flag(p: argparse.ArgumentParser, default: str | None = "paper", help_extra: str = "") -> None:
    p.add_argument("--recipe", choices=RECIPES, default=default, help="paper: the paper's stated method (default); "
                   "authors: the authors' code where it differs (prompt text and placement, top-k 50, SFT loss "
                   "normalisation, visual budgets and truncation, float32 advantages; recipe.py lists them)"
                   + help_extra)


def authors_question(query: str) -> str:
    """The authors' GRPO user text for a query: QUESTION_TEMPLATE + TYPE_TEMPLATE, stripped as their processor
    strips each text chunk."""
    return (QUESTION_TEMPLATE.format(Question=query) + TYPE_TEMPLATE).strip()


def prompt_kwargs(name: str | None, stage: str) -> dict:
    """data.collate's prompt settings for `stage` ("at_sft", "cold_start", "grpo", "eval") under a recipe:
    structured (an instruction in the prompt), template (where and which), visual (merge size, most visual tokens),
    truncate (cut SFT rows to this many tokens, 0 = never)."""
    r = get(name)
    sft = stage in ("at_sft", "cold_start")
    structured = stage in ("grpo", "eval") or (stage == "cold_start" and r.cold_start_instruction)
    return {"structured": structured, "template": r.template, "visual": r.sft_visual if sft else r.grpo_visual,
            "truncate": r.sft_truncate if sft else 0}


def of_checkpoint(meta: dict) -> str:
    """The recipe a checkpoint was trained with (its videosafety_meta.json); "paper" for anything older or other."""
    return (meta or {}).get("args", {}).get("recipe") or "paper"


def check_start(meta: dict, name: str, stage: str) -> str | None:
    """A note when a stage starts from a checkpoint trained under another recipe (its prompts differ from the ones
    this run will use), else None."""
    trained = of_checkpoint(meta)
    if meta.get("stage") and trained != (name or "paper"):
        return (f"note: {stage} runs --recipe {name} from a {meta['stage']} checkpoint trained with --recipe {trained}; "
                "its prompts and budgets differ from the ones it learnt")
    return None
