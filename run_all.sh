#!/usr/bin/env bash
# run_all.sh: the whole VideoSafety-R1 pipeline, end to end.
#
#   demo data (if absent) -> AT-SFT -> cold start -> GRPO -> evaluate base and every stage -> one table
#   -> every stage's ATC heads as a guard (guard.py) on a held-out split -> one guard table
#
# Default: the built-in tiny model on the built-in demo data, on CPU, in a few minutes:
#   bash run_all.sh
# A real model, your data, a GPU (names as in the authors' scripts):
#   BASE_MODEL=lkhl/VideoLLaMA3-2B-Image-HF DATA_ROOT=/data/vst RUN_NAME=vl3-2b bash run_all.sh
#   (DATA_ROOT holds at_sft.jsonl, cold_start.jsonl, grpo.jsonl, eval.jsonl; or set AT_SFT_DATA,
#    COLD_START_DATA, GRPO_DATA, EVAL_DATA one by one.) With a real model the paper's hyperparameters
#   are used; the demo's small budgets and large learning rates apply only to the built-in tiny models.
# SEED (default 42) seeds every training stage. SEEDS="1 2 3" runs the whole pipeline once per seed into
#   $RUNS_DIR/$RUN_NAME-seeds/seed<S>/ and writes one table of mean [min-max] over them, with the demo's story
#   checked run by run: $RUNS_DIR/$RUN_NAME-seeds/report.md (the README's demo table comes from this). Extra flags per stage: AT_SFT_ARGS, COLD_START_ARGS, GRPO_ARGS, EVAL_ARGS.
# Output (RUNS_DIR defaults to runs): $RUNS_DIR/$RUN_NAME/{at_sft,cold_start,grpo} checkpoints,
#         $RUNS_DIR/$RUN_NAME/eval/<stage>/, $RUNS_DIR/$RUN_NAME/report.md and summary.json,
#         $RUNS_DIR/$RUN_NAME/guard/<stage>.json and guard.md (each stage's ATC heads as a guard, on GUARD_DATA).
set -euo pipefail
cd "$(dirname "$0")"

RUN_NAME=${RUN_NAME:-demo}
BASE_MODEL=${BASE_MODEL:-tiny-videollama3}
DATA_ROOT=${DATA_ROOT:-demo_data}
AT_SFT_DATA=${AT_SFT_DATA:-$DATA_ROOT/at_sft.jsonl}
COLD_START_DATA=${COLD_START_DATA:-$DATA_ROOT/cold_start.jsonl}
GRPO_DATA=${GRPO_DATA:-$DATA_ROOT/grpo.jsonl}
EVAL_DATA=${EVAL_DATA:-$DATA_ROOT/eval.jsonl}
# The guard's test split: held out from training and from the stages' ATC threshold fit (which uses EVAL_DATA).
# The demo has one (guard.jsonl); without one the guard is measured on EVAL_DATA, where its thresholds were fitted.
GUARD_DATA=${GUARD_DATA:-$DATA_ROOT/guard.jsonl}
RUNS_DIR=${RUNS_DIR:-runs}
SEED=${SEED:-42}  # every training stage's --seed
OUT=$RUNS_DIR/$RUN_NAME
PY=${PYTHON:-python}

if [ -n "${SEEDS:-}" ]; then  # one whole pipeline per seed, then the combined table
  runs=()
  for s in $SEEDS; do
    echo; echo "##### seed $s"
    SEEDS="" SEED=$s RUNS_DIR="$OUT-seeds" RUN_NAME="seed$s" bash "$0" || exit 1
    runs+=("$OUT-seeds/seed$s")
  done
  $PY eval.py --seeds "${runs[@]}" --out "$OUT-seeds"
  guards=(); for r in "${runs[@]}"; do guards+=("$r"/guard/*.json); done
  $PY guard.py --report "${guards[@]}" --out "$OUT-seeds/guard.md"
  echo; echo "run_all.sh: done. Report over seeds $SEEDS: $OUT-seeds/report.md  Guard: $OUT-seeds/guard.md"
  exit 0
fi

# Budgets. The tiny demo model starts from random weights, so it needs large learning rates and several
# epochs to learn anything in minutes; a real checkpoint gets the paper's defaults (the flags' defaults).
case "$BASE_MODEL" in
  tiny-*)
    AT_SFT_BUDGET="--batch-size 8 --grad-accum 1 --epochs 10 --lr-llm 3e-3 --lr-alarm 3e-2 --lr-heads 3e-2"
    # Cold start: 8 epochs learn the format. The gap GRPO closes comes from the demo's cold-start teacher, whose
    # video tags copy the query's label on two of every three clips where the two disagree (demo.TEACHER_MISREADS).
    COLD_START_BUDGET="--batch-size 8 --grad-accum 1 --epochs 8 --lr-llm 3e-3"
    # GRPO: 300 steps (96 prompts x 12.5 epochs / 4 per step), G = 8 samples per prompt, 2 updates per rollout.
    GRPO_BUDGET="--batch-size 4 --group-size 8 --max-completion-length 96 --lr 2e-4 --passes 2 --epochs 12.5"
    EVAL_BUDGET="--batch-size 20 --max-new-tokens 128" ;;
  *)
    AT_SFT_BUDGET="" ; COLD_START_BUDGET="" ; GRPO_BUDGET="" ; EVAL_BUDGET="" ;;
esac

stage() {  # stage NAME CMD...: run one stage, stop the pipeline with its name if it fails
  local name=$1; shift
  echo; echo "=== [$name] $*"
  local t0=$SECONDS
  if ! "$@"; then
    echo "run_all.sh: stage '$name' FAILED (command above); later stages were not run." >&2
    exit 1
  fi
  echo "=== [$name] done in $((SECONDS - t0)) s"
}

if [ "$DATA_ROOT" = demo_data ]; then  # cheap and deterministic: always rebuilt, never stale
  stage demo_data $PY demo.py --out demo_data
fi
mkdir -p "$OUT"

stage at_sft $PY at_sft.py --model "$BASE_MODEL" --data "$AT_SFT_DATA" --eval-data "$EVAL_DATA" \
  --out "$OUT/at_sft" --seed "$SEED" $AT_SFT_BUDGET ${AT_SFT_ARGS:-}
stage cold_start $PY cold_start.py --model "$OUT/at_sft" --data "$COLD_START_DATA" --eval-data "$EVAL_DATA" \
  --out "$OUT/cold_start" --seed "$SEED" $COLD_START_BUDGET ${COLD_START_ARGS:-}
stage grpo $PY grpo.py --model "$OUT/cold_start" --data "$GRPO_DATA" --eval-data "$EVAL_DATA" --out "$OUT/grpo" \
  --seed "$SEED" $GRPO_BUDGET ${GRPO_ARGS:-}

# Evaluate the base model (as it is, no alarm tokens) and every stage's checkpoint on the same split.
stage eval_base $PY eval.py --model "$BASE_MODEL" --data "$EVAL_DATA" --out "$OUT/eval/base" $EVAL_BUDGET ${EVAL_ARGS:-}
for s in at_sft cold_start grpo; do
  stage "eval_$s" $PY eval.py --model "$OUT/$s" --data "$EVAL_DATA" --out "$OUT/eval/$s" $EVAL_BUDGET ${EVAL_ARGS:-}
done

stage report $PY eval.py --compare "$OUT/eval/base" "$OUT/eval/at_sft" "$OUT/eval/cold_start" "$OUT/eval/grpo" \
  --out "$OUT"

# Every stage's ATC heads as a standalone guard (guard.py: one prefill, no generation) on the guard split.
if [ ! -f "$GUARD_DATA" ]; then
  echo "note: no $GUARD_DATA; the guard is measured on $EVAL_DATA, where the stages fitted its thresholds (in-sample)"
  GUARD_DATA=$EVAL_DATA
fi
for s in at_sft cold_start grpo; do
  stage "guard_$s" $PY guard.py --model "$OUT/$s" --data "$GUARD_DATA" --json "$OUT/guard/$s.json" ${GUARD_ARGS:-}
done
stage guard_report $PY guard.py --report "$OUT/guard/at_sft.json" "$OUT/guard/cold_start.json" \
  "$OUT/guard/grpo.json" --out "$OUT/guard.md"
echo; cat "$OUT/report.md"; echo; cat "$OUT/guard.md"
echo; echo "run_all.sh: done. Report: $OUT/report.md  Table as JSON: $OUT/summary.json  Guard: $OUT/guard.md"
