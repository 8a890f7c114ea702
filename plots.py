"""plots.py: the pictures of a run, from the files it already writes (matplotlib optional).

- `plot_run(dir)`: DIR/metrics.jsonl (training.open_log's rows: a config row, then one row per step, a summary row
  last) -> DIR/curves.png, one figure with a small panel per logged quantity: the raw values as a faint line and
  their moving average on top. The SFT stages log loss and its parts (lm, atc_v, atc_t), the ATC heads' accuracy
  and one lr per parameter group; GRPO logs the reward and each DRA component, α, the label accuracies, the k3 KL,
  the clip fraction, the completion length and the share of zero-variance groups (the learning signal: a group
  whose G rewards are all equal has A = 0 and teaches nothing). Keys a log does not hold are skipped.
  training.finish calls it at the end of every stage (rank 0).
- `compare_chart(runs, path)`: `eval.py --compare --out DIR` -> DIR/compare.png, the headline metrics per stage as
  grouped bars (shares in %, the mean reward on its own axis: its scale is 0..3.1, not a share).

Without matplotlib both say once "plots skipped: pip install matplotlib" and return [] (nothing written): a run
never fails for a picture.

    python plots.py runs/demo/at_sft runs/demo/cold_start runs/demo/grpo     # redraw by hand
"""

from __future__ import annotations

import argparse
import math
import os

import outdir

HINT = "plots skipped: pip install matplotlib"
CURVES = "curves.png"
COMPARE = "compare.png"

# (metrics.jsonl key, panel title) in the order the panels are drawn; lr_<group> keys (SFT) are found in the log
PANELS = [
    # SFT stages (at_sft.py, cold_start.py): L = L_base + λ1·L_ATC^v + λ2·L_ATC^t
    ("loss", "loss"), ("lm", "L_base (token CE)"), ("atc_v", "L_ATC^v (BCE)"), ("atc_t", "L_ATC^t (BCE)"),
    ("atc_v_acc", "ATC-v accuracy (train batch)"), ("atc_t_acc", "ATC-t accuracy (train batch)"),
    # GRPO (grpo.py): reward = DRA of its components
    ("reward", "reward (DRA total)"), ("reward_std", "reward std within group"), ("format_rate", "format reward"),
    ("rouge", "ROUGE reward"), ("video_acc", "video label accuracy"), ("text_acc", "text label accuracy"),
    ("alpha", "α (DRA weight)"), ("kl", "KL to reference (k3)"), ("clip_frac", "clip fraction"),
    ("completion_len", "completion length (tokens)"), ("zero_var_groups", "zero-variance groups (share)"),
    ("lr", "learning rate"),
]
# eval.py --compare: (metrics.json key, bar label); shares, drawn in %
COMPARE_BARS = [("dsr_hh", "DSR-HH"), ("dsr_sh", "DSR-SH"), ("frr_safeq", "FRR-SafeQ"), ("format_rate", "format"),
                ("video_label_acc", "vid acc"), ("text_label_acc", "text acc"), ("atc_v_acc", "ATC-v acc")]

_warned = False


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or None after one printed hint."""
    global _warned
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            print(HINT)
            _warned = True
        return None
    return plt


def moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): m_i = mean(y_max(0,i-w+1) .. y_i)."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def step_rows(path: str) -> list[dict]:
    """The per-step rows of a metrics.jsonl (not the config or summary rows)."""
    return [r for r in outdir.read_jsonl(path) if "step" in r and "config" not in r and "summary" not in r]


def panel_keys(rows: list[dict]) -> list[str]:
    """The PANELS keys these rows hold as numbers (in PANELS order), then the lr_<group> keys in log order."""
    numeric = lambda k: any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)
    keys = [k for k, _ in PANELS if numeric(k)]
    lrs = dict.fromkeys(k for r in rows for k in r if k.startswith("lr_"))
    return keys + [k for k in lrs if numeric(k)]


def plot_run(directory: str, out: str | None = None) -> list[str]:
    """DIRECTORY/metrics.jsonl -> `out` (default DIRECTORY/curves.png). Returns the keys plotted, one panel each
    ([] when matplotlib is missing or the log has no step rows; nothing is written then)."""
    path = os.path.join(directory, "metrics.jsonl")
    rows = step_rows(path) if os.path.exists(path) else []
    keys = panel_keys(rows)
    if not keys:
        return []
    plt = _pyplot()
    if plt is None:
        return []
    titles = dict(PANELS)
    x = list(range(1, len(rows) + 1))  # the log's step rows in order (AT-SFT's phases follow one another)
    # phase boundaries (AT-SFT: alarm warm-up, then the full stage): a dotted line where the phase changes
    bounds = [(i + 1, r.get("phase")) for i, r in enumerate(rows) if i and r.get("phase") != rows[i - 1].get("phase")]
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.6 * nrows), squeeze=False)
    window = max(1, len(rows) // 10)
    for ax, key in zip(axes.flat, keys):
        pts = [(xi, float(r[key])) for xi, r in zip(x, rows) if isinstance(r.get(key), (int, float))]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=1)
        ax.plot(xs, moving_average(ys, window), color="tab:blue", linewidth=1.8)
        for b, name in bounds:
            ax.axvline(b, color="gray", linestyle=":", linewidth=1)
        ax.set_title(titles.get(key, key.replace("lr_", "learning rate: ")), fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if key.startswith("lr"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    phases = " -> ".join(dict.fromkeys(str(r["phase"]) for r in rows if r.get("phase")))
    fig.suptitle(f"{os.path.basename(os.path.normpath(directory))}: {len(rows)} steps"
                 + (f" ({phases})" if phases else "") + f"; x: step; faint: each step, bold: mean of the last {window}", fontsize=11)
    # fixed margins: tight_layout would measure every tick label first, the slowest part of drawing the figure
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.5 / (2.6 * nrows), top=1 - 0.75 / (2.6 * nrows),
                        wspace=0.3, hspace=0.55)
    fig.savefig(out or os.path.join(directory, CURVES), dpi=100)
    plt.close(fig)
    return keys


def compare_chart(runs: list[tuple[str, dict]], path: str) -> list[str]:
    """(run name, metrics.json) per run -> grouped bars at `path`: the COMPARE_BARS shares in %, and the mean
    reward in a second panel. Returns the metric keys drawn ([] without matplotlib or without any metric)."""
    keys = [k for k, _ in COMPARE_BARS if any(isinstance(m.get(k), (int, float)) for _, m in runs)]
    reward = any(isinstance(m.get("mean_reward"), (int, float)) for _, m in runs)
    if not keys and not reward:
        return []
    plt = _pyplot()
    if plt is None:
        return []
    labels = dict(COMPARE_BARS)
    fig, axes = plt.subplots(1, 2 if reward else 1, figsize=(11 if reward else 9, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": [5, 1]} if reward else None)
    width = 0.8 / len(runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0][0]
    for j, (name, m) in enumerate(runs):
        # a metric the run did not measure gets no bar; each bar carries its value, so a measured 0 shows as "0"
        pts = [(i + (j - (len(runs) - 1) / 2) * width, 100 * m[k]) for i, k in enumerate(keys)
               if isinstance(m.get(k), (int, float))]
        bars = ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=name, color=colors[j % len(colors)])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(keys)), [labels[k] for k in keys], fontsize=9)
    ax.set_ylabel("%")
    ax.set_ylim(0, 110)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(len(runs), 4), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.set_title("headline metrics per run (FRR: lower is better)", fontsize=10)
    if reward:
        ax = axes[0][1]
        for j, (name, m) in enumerate(runs):
            r = m.get("mean_reward")
            if isinstance(r, (int, float)):
                bars = ax.bar((j - (len(runs) - 1) / 2) * width, r, width, color=colors[j % len(colors)])
                ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks([0], ["reward"], fontsize=9)
        ax.set_xlim(-0.5, 0.5)  # the runs' bars side by side around 0, whichever of them measured a reward
        ax.set_ylim(0, 3.2)  # DRA's attainable maximum is 3.1 (rewards.py)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title("mean reward", fontsize=10)
        keys = keys + ["mean_reward"]
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return keys


def main(argv=None) -> None:
    # argparse itself, not cli.parser: cli imports training, which imports this file
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument_group("runs").add_argument("runs", nargs="+", metavar="RUN_DIR", help="a stage's --out folder "
                                              "(holding metrics.jsonl); curves.png is written there")
    for d in p.parse_args(argv).runs:
        keys = plot_run(d)
        if keys:
            print(f"{os.path.join(d, CURVES)}: {', '.join(keys)}")
        elif _pyplot() is not None:
            print(f"{d}: no step rows in {os.path.join(d, 'metrics.jsonl')}; nothing drawn")


if __name__ == "__main__":
    main()
