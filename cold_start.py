"""cold_start.py: supervised cold start on structured chain-of-thought (stage 3 of the authors' code).

Before GRPO the model must already speak the structured format the reward reads:

    <think>…</think><answer>…</answer><vidType>0|1</vidType><textType>0|1</textType>   (1 harmful, 0 safe)

This stage is AT-SFT's loop (sft.train_sft, shared with at_sft.py) with three differences, and nothing else:
  1. data: the cold-start split, whose targets are in the structured format, and prompts that carry the
     structured-output instruction;
  2. loss: L = L_base only (no ATC loss);
  3. trainable: the LLM only. The alarm tokens stay in every prompt, their vectors and the ATC heads are
     frozen (as are the vision encoder and projector).
The heads' decision thresholds are refitted on the held-out split at the end (training.calibrate_atc): the heads
are frozen copies, but the LLM under them moved, so AT-SFT's cut no longer fits while their ranking still does.

Where we depart from the paper: opt-in `--lora` trains low-rank adapters on the LLM's projections instead of its
weights (the paper fine-tunes the whole LLM), merged into the saved checkpoint (lora.py); one process only.

`--recipe authors` (recipe.py): prompts as their stage 3 writes them, the record's query with no instruction (their
CoT data carries whatever its human turns say), their loss scale, visual budget and cut at 8192 tokens.

Run:
    python cold_start.py --model runs/demo/at_sft                 # after at_sft.py, on the demo data
    python cold_start.py --model runs/vsr1/at_sft --data vst_cold_start.jsonl --out runs/vsr1/cold_start \
        --batch-size 4 --grad-accum 32 --gradient-checkpointing
    torchrun --nproc_per_node 8 cold_start.py --model runs/vsr1/at_sft --data vst_cold_start.jsonl \
        --out runs/vsr1/cold_start --batch-size 4 --grad-accum 4 --gradient-checkpointing   # 8 GPUs, FSDP2
"""

from __future__ import annotations

import cli
import recipe as RC
import training as T
from sft import get_args, heldout_check, start, train_sft


def main(argv=None) -> dict:
    args = get_args(argv, stage="cold_start", doc=__doc__, model="runs/demo/at_sft")
    T.seed_everything(args.seed)
    llm, records, heldout, log, skipped, resume = start(args, "cold start", structured=True)

    prompt = RC.prompt_kwargs(args.recipe, "cold_start")  # paper: the instruction; authors: the query as written
    steps = train_sft(llm, args, records, phase="cold_start", prompt=prompt, use_atc=False,
                      train_alarm=False, train_heads=False, log=log, skipped=skipped, resume=resume)

    summary = {"stage": "cold_start", "step": steps}
    # the frozen heads read a moved LLM: refit their thresholds; do greedy answers pass the format check?
    summary.update(heldout_check(llm, heldout, args, stage="cold_start", prompt=prompt,
                                 n_generate=min(len(heldout), 16)))
    return T.finish(llm, args.out, vars(args), log, skipped, summary)


if __name__ == "__main__":
    cli.run_cli(main)
