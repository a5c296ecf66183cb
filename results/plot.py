"""Plots of the miniature reproduction from the JSON/JSONL the scripts write (PNG files in results/).

    python results/plot.py                   # every figure whose data is present

- probes.png: Pre-Train Perf. against training tokens for each recipe probe (results/probes/*.jsonl)
- pretrain.png: the same for the reproduction's models (results/pretrain/*.jsonl)
- figure1.png: GLUE average against Pre-Train Perf., one point per fine-tuned checkpoint (Fig. 1)
- figure5.png: MRPC accuracy against pretraining epoch for each model's kept checkpoints (Fig. 5)
- claims.png: claims (b) and (c) as differences of GLUE averages within each pretraining, mean and 95% interval
- table3.png: the same for Table 3's added relation sites (T, I, A)
- hf_curve.png: ours and HF's BertForMaskedLM trained side by side (results/hf_curve.jsonl)
Needs matplotlib (requirements-dev.txt); the scripts themselves never import it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tables import (MODELS, PAPER_SIGN, TABLE3_PAPER_SIGN, TABLE3_ROWS, claim_differences, figure5_points, figure5_seeds,  # noqa: E402
                    mean_se, t_interval, table3_differences, table3_rows, table3_sets)


def curve(path: Path) -> tuple[list[float], list[float]]:
    """(tokens in millions, Pre-Train Perf.) of a pretrain.py metrics file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    valid = [r for r in rows if r.get("valid") and "tokens" in r]
    return [r["tokens"] / 1e6 for r in valid], [r["pretrain_perf"] for r in valid]


# the report's names for the runs' file names (legends never show an internal name)
NAMES = {**dict(MODELS), "vanilla": "Vanilla BERT", "moe": "MoE BERT", "moe_t": "MoE + T", "moe_tia": "MoE + T, I, A",
         "moe_ec": "MoE BERT, expert choice", "moe_mode": "MoE BERT + MoDE (our reading)",
         "moe_ec_perf": "expert choice, perf-aligned", "moe_ec_epoch": "expert choice, epoch-aligned",
         "moe_mode_perf": "MoE + MoDE, perf-aligned", "moe_mode_epoch": "MoE + MoDE, epoch-aligned"}


def shown_name(name: str) -> str:
    return NAMES.get(name, name)


def merge_identical(series: dict[str, tuple]) -> dict[str, tuple]:
    """{legend label: (x, y)}, series with equal points drawn once under both names ("A = B"), so
    none hides under another's markers."""
    merged: dict[tuple, list[str]] = {}
    for name, (x, y) in series.items():
        merged.setdefault((tuple(x), tuple(y)), []).append(shown_name(name))
    return {" = ".join(names): xy for xy, names in merged.items()}


def plot_curves(files: list[Path], out: Path, title: str) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {f.name.split(".")[0]: curve(f) for f in files}
    for i, (label, (x, y)) in enumerate(merge_identical({k: v for k, v in series.items() if v[0]}).items()):
        marker, line = STYLES[i % len(STYLES)]
        ax.plot(x, y, marker=marker, linestyle=line, markersize=4, label=label)
    ax.set_title(title)
    finish(fig, ax, out, "training tokens (millions)", "Pre-Train Perf. (held-out masked-token log-likelihood)")


def plot_hf_curve(path: Path, out: Path) -> None:
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, label in (("ours", "model.py"), ("hf", "transformers.BertForMaskedLM")):
        ax.plot([r["step"] for r in rows], [r[side] for r in rows], marker=".", label=label)
    ax.set_title("Same weights, batches and masks (tiny, batch 32)")
    finish(fig, ax, out, "optimizer steps", "Pre-Train Perf. (held-out masked-token log-likelihood)")


SMOKE = False          # set by --smoke: every figure says it is a smoke test


def finish(fig, ax, out: Path, xlabel: str, ylabel: str) -> None:
    import matplotlib.pyplot as plt
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if SMOKE:                                         # a banner below the axes, clear of the legend
        fig.subplots_adjust(bottom=fig.subplotpars.bottom + 0.08)
        fig.text(0.5, 0.01, "SMOKE TEST (run.sh --quick): these numbers mean nothing", ha="center", va="bottom",
                 fontsize=10, color="red")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def finetune_points(directory: Path) -> list[dict]:
    """One point per finetune.py result: its checkpoint's pretraining state and GLUE scores."""
    points = []
    for f in sorted(directory.glob("*.json")):
        result = json.loads(f.read_text())
        pre = result.get("pretrained") or {}
        row = {key: None if value == "-" else float(value) for key, value in result.get("paper_row", {}).items()}
        points.append({"name": f.stem, "pretrain_perf": pre.get("pretrain_perf"), "epoch": pre.get("epoch"),
                       "avg": row.get("Avg"), "mrpc": row.get("MRPC acc")})
    return points


STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-"), ("P", "--"), ("X", ":")]


def plot_points(points: list[dict], x: str, y: str, out: Path, xlabel: str, ylabel: str, title: str,
                floor: float | None = None) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    if floor is not None:
        ax.axhline(floor, linestyle="--", color="grey", label="no pretraining")
    groups: dict = {}
    for p in points:
        if p[x] is not None and p[y] is not None:
            groups.setdefault(p["name"].split(".")[0], []).append(p)
    series = {name: ([p[x] for p in sorted(ps, key=lambda p: p[x])], [p[y] for p in sorted(ps, key=lambda p: p[x])])
              for name, ps in groups.items()}
    for i, (label, (xs, ys)) in enumerate(merge_identical(series).items()):  # equal series: one entry, "A = B"
        marker, line = STYLES[i % len(STYLES)]
        ax.plot(xs, ys, marker=marker, linestyle=line, markersize=9 - i % 5,
                markerfacecolor="none" if i % 2 else None, label=label)
    if x == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    finish(fig, ax, out, xlabel, ylabel)


def plot_differences(items: list[tuple[str, list[str], list[float], int]], out: Path, title: str) -> bool:
    """One line per (label, pretraining names, differences, the paper's sign): a dot per pretraining, the mean
    and its 95% t-interval in black, and an arrow toward the side of 0 the paper says it falls on. False
    (nothing drawn) when no difference has two pretrainings."""
    import matplotlib.pyplot as plt
    items = [it for it in items if len(it[2]) >= 2]
    if not items:
        return False
    colors = {}
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(items) + 1.6))
    for i, (_, names, diffs, sign) in enumerate(items):
        y = len(items) - 1 - i
        for name, d in zip(names, diffs):
            first = name not in colors                                  # one legend entry per pretraining
            ax.plot(d, y, "o", color=colors.setdefault(name, f"C{len(colors)}"), alpha=0.7, label=name if first else None)
        mean, _ = mean_se(diffs)
        lo, hi = t_interval(diffs)
        ax.errorbar(mean, y, xerr=[[mean - lo], [hi - mean]], fmt="D", color="black", capsize=4)
        paper = "→" if sign > 0 else "←"
        ax.annotate(f"paper {paper}", (0, y), textcoords="offset points", xytext=(6 if paper == "→" else -50, 6),
                    fontsize=7, color="grey")
    ax.axvline(0, color="grey", linewidth=1)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([it[0] for it in reversed(items)], fontsize=8)
    ax.set_title(title, fontsize=9)
    finish(fig, ax, out, "difference of GLUE averages (points) within a pretraining", "")
    return True


def plot_claims(results: Path, out: Path) -> bool:
    """Claims (b) and (c), each difference of claim_differences, drawn by plot_differences."""
    labels = dict(MODELS)
    items = [(f"{claim} {labels[row]} − {labels[other]}", names, diffs, PAPER_SIGN[claim])
             for claim, row, other, names, diffs in claim_differences(results)]
    return plot_differences(items, out, "Claims (b) and (c) within each pretraining; black: mean and 95% t-interval")


def plot_table3(results: Path, out: Path) -> bool:
    """Table 3's added sites (T, I, A), each difference of table3_differences, drawn by plot_differences."""
    labels = dict(TABLE3_ROWS)
    rows = table3_rows(results, table3_sets(results)[0])
    items = [(f"{site}: {labels[row]} − {labels[other]}", names, diffs, TABLE3_PAPER_SIGN[site])
             for site, row, other, names, diffs, _ in table3_differences(rows)]
    return plot_differences(items, out, "Table 3, each relation site added within a pretraining; black: mean and 95% t-interval")


def routing_series(curve: Path, key: str) -> tuple[list[float], list[list[float]]]:
    """(training tokens in millions, per-layer values of `key`) from a pretrain.py metrics file's logged rows."""
    rows = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()] if curve.is_file() else []
    rows = [r for r in rows if key in r]
    return [r["tokens"] / 1e6 for r in rows], [r[key] for r in rows]


def plot_routing(arms: Path, out: Path, top1: Path | None = None) -> bool:
    """The arms' routing over training, per layer: the busiest expert against the mean load, for the top-1 MoE
    (`top1`: a curve of the baseline's recipe, e.g. MoDE's alpha = 0 probe) and the top-1 MoE + MoDE; expert
    choice's share of tokens no expert took, and experts per chosen token (c = 1: 1 on average)."""
    import matplotlib.pyplot as plt
    panels = [(top1, "layer_load_max", "top-1 MoE (the baseline): busiest expert / mean load"),
              (arms / "pretrain" / "moe_mode.jsonl", "layer_load_max", "top-1 + MoDE: busiest expert / mean load"),
              (arms / "pretrain" / "moe_ec.jsonl", "layer_unchosen", "expert choice: share of tokens no expert took"),
              (arms / "pretrain" / "moe_ec.jsonl", "layer_experts_per_token", "expert choice: experts per chosen token")]
    panels = [(routing_series(f, key) if f else ([], []), title) for f, key, title in panels]
    if not any(x for (x, _), _ in panels[1:]):
        return False
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, ((x, values), title) in zip(axes, panels):
        for layer in range(len(values[0]) if values else 0):
            ax.plot(x, [v[layer] for v in values], linewidth=1, label=f"layer {layer + 1}")
        ax.set_title(title if values else title + " (no curve)", fontsize=9)
        ax.set_xlabel("training tokens (millions)")
        ax.grid(alpha=0.3)
        if values:
            ax.legend(fontsize=7)
    fig.tight_layout()
    if SMOKE:
        fig.text(0.5, 0.01, "SMOKE TEST (run.sh --quick): these numbers mean nothing", ha="center", fontsize=10, color="red")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return True


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(HERE), help="directory that results/run.sh filled")
    p.add_argument("--smoke", action="store_true", help="mark every figure as a smoke test (run.sh --quick)")
    args = p.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    return draw(Path(args.results))


def draw(results: Path) -> int:
    for sub, title in (("probes", "Recipe probes, tiny teacher"), ("pretrain", "Pretraining")):
        files = sorted((results / sub).glob("*.jsonl"))
        if files:
            plot_curves(files, results / f"{sub}.png", title)
    if (results / "hf_curve.jsonl").is_file():
        plot_hf_curve(results / "hf_curve.jsonl", results / "hf_curve.png")
    glue = finetune_points(results / "finetune") if (results / "finetune").is_dir() else []
    floor = next((p for p in glue if p["name"] == "scratch"), {})       # the no-pretraining floor's scores
    glue = [p for p in glue if p["name"] not in ("scratch", "minilm")]
    if glue:
        plot_points(glue, "pretrain_perf", "avg", results / "figure1.png", "Pre-Train Perf.", "GLUE average (dev)",
                    "Fig. 1 at the miniature: GLUE average against Pre-Train Perf., a point per checkpoint", floor.get("avg"))
    fig5 = [{"name": model, "epoch": epoch, "mrpc": acc} for model, by_epoch in figure5_points(results).items()
            for epoch, (acc, _, _) in by_epoch.items()]
    if fig5:
        seeds = " or ".join(map(str, figure5_seeds(results)))
        plot_points(fig5, "epoch", "mrpc", results / "figure5.png", "pretraining epoch", "MRPC accuracy (dev, full fine-tuning)",
                    f"Fig. 5 at the miniature: MRPC from each kept epoch (mean of {seeds} seed"
                    f"{'s' * (seeds != '1')})", floor.get("mrpc"))
    plot_claims(results, results / "claims.png")
    plot_table3(results, results / "table3.png")
    # the top-1 baseline's own routing: MoDE's alpha = 0 probe is its recipe and seed, bit for bit (2 epochs),
    # and moe_top1.jsonl that probe continued to the arms' 6 epochs
    top1 = results / "arms" / "pretrain" / "moe_top1.jsonl"
    plot_routing(results / "arms", results / "routing.png", top1 if top1.is_file() else results / "probes" / "mode" / "a0.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
