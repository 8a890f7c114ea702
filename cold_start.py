"""cold_start.py: supervised cold start on structured chain-of-thought (stage 3 of the authors' code).

Before GRPO the model must already speak the structured format the reward reads:

    <think>…</think><answer>…</answer><vidType>0|1</vidType><textType>0|1</textType>   (1 harmful, 0 safe)

This stage is AT-SFT's loop (at_sft.train_sft) with three differences, and nothing else:
  1. data: the cold-start split, whose targets are in the structured format, and prompts that carry the
     structured-output instruction;
  2. loss: L = L_base only (no ATC loss);
  3. trainable: the LLM only. The alarm tokens stay in every prompt, their vectors and the ATC heads are
     frozen (as are the vision encoder and projector).

Run:
    python cold_start.py --model runs/demo/at_sft                 # after at_sft.py, on the demo data
    python cold_start.py --model runs/vsr1/at_sft --data vst_cold_start.jsonl --out runs/vsr1/cold_start \
        --batch-size 4 --grad-accum 32 --gradient-checkpointing
"""

from __future__ import annotations

import json

import torch

import data as D
import model as M
from at_sft import get_args, heldout_check, open_log, train_sft


def main(argv=None) -> dict:
    args = get_args(argv, stage="cold_start", description=__doc__.split("\n\n")[0], model="runs/demo/at_sft")
    M.seed_everything(args.seed)
    llm = M.load_model(args.model, device=args.device, dtype=torch.float32, with_alarm=True,
                       trust_remote_code=args.trust_remote_code)
    if args.gradient_checkpointing:
        llm.model.gradient_checkpointing_enable()
    records = D.load_records(args.data)
    log = open_log(args.out)
    log({"config": vars(args)})
    print(f"cold start: {len(records)} records from {args.data}; model {args.model}; out {args.out}")

    steps = train_sft(llm, args, records, phase="cold_start", structured=True, use_atc=False,
                      train_alarm=False, train_heads=False, log=log)

    summary = {"stage": "cold_start", "steps": steps}
    if args.eval_records:  # do greedy answers pass the format check on held-out prompts?
        heldout = D.load_records(args.eval_data)[:args.eval_records]
        summary.update(heldout_check(llm, heldout, args, structured=True, n_generate=min(len(heldout), 16)))
    log({"summary": summary})
    M.save_checkpoint(llm, args.out, meta={"stage": "cold_start", "args": vars(args), "step": steps, **summary})
    print(json.dumps(summary, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    main()
