"""cli.py: the command line every entry point shares (the training stages, eval.py, bench.py).

- `parser(doc)`: one argument-block style for all: the file's docstring opens --help, each flag's default is
  shown beside its help, and flags are grouped under headers;
- the flags several entry points have, added in one place (`add_video_flags`, `add_run_flags`,
  `add_snapshot_flags` with --report-to, `add_heldout_flags`, `add_lora_flags`), their defaults taken from the
  module that owns the setting;
- checked number types for every numeric flag (`positive_int`, `probability`, ...): a bad value is an argparse
  error (exit 2) when the arguments are parsed, before any data or model is read;
- `run_cli(main)`: bad input or a stopped run ends with one clear line and a non-zero exit, not a traceback
  (unless --debug is given).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import data as D
import lora
from chat_api import APIError
from outdir import OutputBusy
from training import TrainingError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default beside its help (unless the help already says it, or there is none: None / a switch);
    the description printed as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        unshown = any(action.default is x for x in (None, False, argparse.SUPPRESS))  # nothing worth saying
        if "default" in text or unshown or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def number(kind: type, *, low=None, high=None, low_open: bool = False, high_open: bool = False, what: str = ""):
    """An argparse type: `kind` (int or float) within [low, high] (an end excluded with low_open / high_open);
    nan / inf refused."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        bad = (isinstance(value, float) and not math.isfinite(value)) or (
            low is not None and (value <= low if low_open else value < low)) or (
            high is not None and (value >= high if high_open else value > high))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what or kind.__name__  # argparse names the type in its messages
    return parse


positive_int = number(int, low=1, what="an integer >= 1")
nonneg_int = number(int, low=0, what="an integer >= 0")
seed_int = number(int, low=0, high=2 ** 32 - 1, what="an integer in [0, 2**32 - 1]")  # what numpy's seed takes
positive_float = number(float, low=0, low_open=True, what="a number > 0")
nonneg_float = number(float, low=0, what="a number >= 0")
unit_float = number(float, low=0, high=1, what="a number in [0, 1]")
probability = number(float, low=0, high=1, low_open=True, what="a number in (0, 1]")
dropout_rate = number(float, low=0, high=1, high_open=True, what="a number in [0, 1)")  # 1 would zero every input


def parser(doc: str, whole: bool = False) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the first paragraph of `doc` (a module docstring), or all of it."""
    text = doc.strip() if whole else doc.strip().split("\n\n")[0]
    return argparse.ArgumentParser(description=text, formatter_class=HelpFormatter)


def add_video_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video")
    g.add_argument("--fps", type=positive_float, default=D.FPS, help="frames sampled per second of video (paper: 1)")
    g.add_argument("--max-frames", type=positive_int, default=D.MAX_FRAMES, help="at most this many frames per video "
                   "(paper: 90)")


def add_heldout_flags(g) -> None:
    """--eval-data / --eval-records of the training stages (in their "model and data" group): the held-out records
    on which each stage fits the ATC heads' thresholds at the end of the run (training.calibrate_atc)."""
    g.add_argument("--eval-data", default=None, help="held-out JSONL for the end-of-run check and the ATC heads' "
                   "threshold fit (default: the demo's eval split)")
    g.add_argument("--eval-records", type=nonneg_int, default=60, help="held-out records for the end-of-run check "
                   "(0 = skip; the thresholds are then 0.5)")


def add_run_flags(p: argparse.ArgumentParser, seed: int, seed_help: str) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=seed_int, default=seed, help=seed_help)
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available; under torchrun "
                   "each process its cuda:LOCAL_RANK)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code (off by default)")
    g.add_argument("--skip-bad-records", action="store_true", help="leave out (and name in the run's summary) records "
                   "with bad fields or undecodable videos or images instead of stopping; a video is never replaced by "
                   "another")
    g.add_argument("--debug", action="store_true", help="show the Python traceback on bad input instead of one line")


def add_snapshot_flags(p: argparse.ArgumentParser, resume_help: str) -> None:
    g = p.add_argument_group("memory and snapshots")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward to save "
                   "memory (generation keeps its KV cache)")
    g.add_argument("--save-every", type=nonneg_int, default=50,
                   help="write a resumable snapshot to OUT/resume every N steps (0 = only at the end)")
    g.add_argument("--resume", action="store_true", help=resume_help)
    g.add_argument("--report-to", choices=("none", "tensorboard"), default="none", help="also write every logged "
                   "number live to a TensorBoard log in OUT/tensorboard (optional: pip install tensorboard; then "
                   "tensorboard --logdir OUT). OUT/metrics.jsonl and OUT/curves.png are written either way")


def targets(text: str) -> tuple:
    """--lora-targets: comma-separated module names (q_proj,v_proj ...)."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names or not all(n.replace("_", "").isalnum() for n in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated module names, got {text!r}")
    return names


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    """The training stages' --lora (a departure from the paper's full fine-tuning; lora.py)."""
    g = p.add_argument_group("LoRA (opt-in; the paper fine-tunes the whole LLM; needs peft)")
    g.add_argument("--lora", action="store_true", help="train low-rank adapters on the LLM's projections instead of "
                   "its weights (alarm vectors and ATC heads still train in full); the saved checkpoint has them "
                   "merged in, a plain model. One process only")
    g.add_argument("--lora-r", type=positive_int, default=lora.R, help="adapter rank r")
    g.add_argument("--lora-alpha", type=positive_float, default=lora.ALPHA, help="adapter scale α (update (α/r)·BA)")
    g.add_argument("--lora-dropout", type=dropout_rate, default=lora.DROPOUT, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", type=targets, default=lora.TARGETS, help="comma-separated names of the "
                   "language model's linear layers that get adapters (default: %s)" % ",".join(lora.TARGETS))


def run_cli(main) -> None:
    """Run a stage's main(): bad input or a stopped run ends with one clear line and a non-zero exit,
    not a traceback (unless --debug is given)."""
    try:
        main()
    except (D.DataError, TrainingError, lora.LoraError, APIError, OutputBusy, OSError, UnicodeDecodeError) as e:
        if "--debug" in sys.argv:
            raise
        if isinstance(e, UnicodeDecodeError):  # a file saved in another encoding (Latin-1 from a spreadsheet, ...)
            e = D.DataError(f"a file is not UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8")
        kind = ("bad input" if isinstance(e, D.DataError) else "stopped" if isinstance(e, TrainingError)
                else "service" if isinstance(e, APIError) else "busy" if isinstance(e, OutputBusy) else "error")
        print(f"{os.path.basename(sys.argv[0])}: {kind}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(2 if isinstance(e, D.DataError) else 1)
