"""at_sft.py: Alarm Token-guided Safety Fine-Tuning (AT-SFT).

The first design of VideoSafety-R1. Two alarm tokens are put in every prompt (<|visual_alarm|> after the
video, <|textual_alarm|> after the query); their embeddings are learnable vectors, and one ATC head per
modality reads the last-layer hidden state at its alarm token and says "harmful or safe". Training uses

    L = L_base + λ1·L_ATC^v + λ2·L_ATC^t          (λ1 = λ2 = 0.1; L_ATC = binary cross-entropy)

on the AT-SFT split (plain answers), with the vision encoder and projector frozen.

Run (one process; CPU or one GPU):
    python at_sft.py                                              # built-in tiny model on the demo data
    python at_sft.py --model lkhl/VideoLLaMA3-2B-Image-HF --data vst_at_sft.jsonl --out runs/vsr1/at_sft \
        --batch-size 4 --grad-accum 32 --gradient-checkpointing

Run (8 GPUs, one node; the model is sharded with FSDP2, the data split over the processes; the same global
batch of 4 × 4 × 8 = 128 gives the same steps as one process with --grad-accum 32):
    torchrun --nproc_per_node 8 at_sft.py --model lkhl/VideoLLaMA3-2B-Image-HF --data vst_at_sft.jsonl \
        --out runs/vsr1/at_sft --batch-size 4 --grad-accum 4 --gradient-checkpointing

Where we depart from the authors' code, and why:
- They train in two runs: stage 1 "alarm init" (LM loss only, LLM + alarm vectors) and stage 2 (the full
  loss, + heads). The paper describes the single objective above. Default: the single objective;
  `--two-phase` runs the authors' recipe (phase 1 then phase 2, one epoch budget each) in one command.
- Weights are kept in fp32 with bf16 autocast on GPU (the authors train bf16 weights under DeepSpeed,
  which also keeps fp32 master weights); on CPU everything is fp32.
- The LM loss is a token mean over the micro-batch's assistant tokens, divided by --grad-accum (the paper's
  equation). `--recipe authors` takes their HF Trainer's scale instead: (Σ token CE + λ·BCE) / the step's label
  tokens (alarm.at_sft_loss), with their visual budget and their cut at 8192 tokens (recipe.py lists every setting).
- Opt-in `--lora` (the paper fine-tunes the whole LLM): low-rank adapters on the LLM's projections train instead
  of its weights, the alarm vectors and ATC heads in full; the checkpoint has the adapters merged in (lora.py).
  For one GPU of 24 GB; one process only.

The loop is sft.py's (`train_sft`), shared with cold_start.py, which runs it with its own data and settings. The
alarm tokens, the ATC heads and the loss are in alarm.py; the model plumbing in model.py; snapshots, logs and the
schedule in training.py.
"""


from __future__ import annotations

import cli
import recipe as RC
import training as T
from sft import get_args, heldout_check, start, train_sft


def main(argv=None) -> dict:
    args = get_args(argv, doc=__doc__)
    T.seed_everything(args.seed)
    llm, records, heldout, log, skipped, resume = start(args, "AT-SFT")
    common = dict(log=log, skipped=skipped, resume=resume)
    prompt = RC.prompt_kwargs(args.recipe, "at_sft")

    steps = 0
    if args.two_phase and not (resume and resume["phase"] == "at_sft"):
        # the authors' stage 1, alarm init: LM loss only; LLM + alarm vectors
        steps += train_sft(llm, args, records, phase="alarm_init", prompt=prompt, use_atc=False,
                           train_alarm=True, train_heads=False, **common)
    steps += train_sft(llm, args, records, phase="at_sft", prompt=prompt, use_atc=True,
                       train_alarm=True, train_heads=True, **common)

    summary = {"stage": "at_sft", "step": steps}
    summary.update(heldout_check(llm, heldout, args, stage="at_sft", prompt=prompt))  # thresholds fitted here
    return T.finish(llm, args.out, vars(args), log, skipped, summary)


if __name__ == "__main__":
    cli.run_cli(main)
