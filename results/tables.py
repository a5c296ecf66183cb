"""The README's reproduction tables, in markdown, from the JSON that results/run.sh collects.

    python results/tables.py [--results DIR] > results/tables.md

Tables 1-2 layout (GLUE dev, the better of full and adapter per task, mean ± std over seeds),
each mode separately, Table 4 (OOD log-likelihood) and Figure 5's numbers (MRPC per kept epoch).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.stats import t as student_t

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from finetune import TASKS, main_score, summarize  # noqa: E402
from align import AlignError, align  # noqa: E402
SMOKE = "**Smoke test** (`run.sh --quick`: a few steps, one seed, one epoch): these numbers mean nothing."
MODELS = [("minilm", "all-MiniLM-L6-v2 (anchor: a well-pretrained BERT, one seed)"),
          ("scratch", "BERT, no pretraining (floor)"), ("teacher", "Vanilla BERT (teacher)"),
          ("moe_perf", "MoE BERT, perf-aligned"), ("moe_epoch", "MoE BERT, epoch-aligned"), ("moe_tcd", "MoE BERT w/ TCD")]
COLUMNS = [("CoLA", "mcc"), ("MRPC", "acc"), ("MRPC", "f1"), ("SST-2", "acc"), ("STS-B", "pearson"),
           ("STS-B", "spearman"), ("RTE", "acc")]
OOD = [("ArXiv", "AX"), ("DM Mathematics", "DM"), ("Github", "GH"), ("StackExchange", "SE"), ("Ubuntu IRC", "UI")]


def cell(setting: dict, metric: str, mark: str = "") -> tuple[str, float | None]:
    if setting is None or metric not in setting["mean"]:
        return "-", None
    m, s = setting["mean"][metric], setting["std"][metric]
    return f"{m:.2f} ± {s:.2f}{mark}", m


def best_setting(data: dict, task: str, mode: str | None) -> dict | None:
    """The setting with the best mean main score on `task` (of one mode, or of both when mode is None)."""
    settings = data["summary"].get(task, {}).get("settings", [])
    pool = [s for s in settings if mode is None or s["mode"] == mode]
    spec = next(t for t in TASKS.values() if t.name == task)
    return max(pool, key=lambda s: main_score(s["mean"], spec), default=None)


def per_seed(data: dict, task: str, setting: dict | None, metric: str) -> dict[int, float]:
    """{seed: best-epoch value of metric} over the runs of one setting."""
    if setting is None:
        return {}
    return {r["seed"]: r["best"][metric] for r in data["runs"] if r["task"] == task
            and (r["mode"], r["adapter"], r["lr"]) == (setting["mode"], setting["adapter"], setting["lr"])}


def average_cell(columns: list[dict[int, float]]) -> str:
    """The average over all columns, ± the std over seeds of each seed's own average where every column
    has the same seeds; '-' until every column has a value (a partial average would not compare)."""
    if len(columns) < len(COLUMNS) or not all(columns):
        return "-"
    seeds = set(columns[0])
    if len(seeds) > 1 and all(set(c) == seeds for c in columns):
        averages = [np.mean([c[s] for c in columns]) for s in sorted(seeds)]
        return f"{np.mean(averages):.2f} ± {np.std(averages):.2f}"
    return f"{np.mean([np.mean(list(c.values())) for c in columns]):.2f}"


def only_seeds(data: dict, seeds: list[int]) -> dict:
    """The results file as if only these seeds had run (a snapshot with the same seeds in every row)."""
    runs = [r for r in data["runs"] if r["seed"] in seeds]
    return {**data, "runs": runs, "summary": summarize(runs)}


def perf_cell(data: dict) -> str:
    """The Pre-Train Perf. of the checkpoint the runs came from; each value where a retrained checkpoint
    (the same step, float noise) gave some of them."""
    perfs = {f"{r['pretrain_perf']:.3f}" for r in data["runs"] if r.get("pretrain_perf") is not None}
    if perfs:
        return " / ".join(sorted(perfs, key=float))
    perf = (data.get("pretrained") or {}).get("pretrain_perf")      # files written before runs recorded it
    return "-" if perf is None else f"{perf:.3f}"


def row_results(results: Path, key: str, seeds: list[int] | None) -> dict | None:
    """A Tables 1-2 row's finetune.py results (only these seeds' runs, if given); None if it has none."""
    f = results / "finetune" / f"{key}.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    return only_seeds(data, seeds) if seeds else data


def glue_rows(results: Path, mode: str | None, seeds: list[int] | None = None) -> list[str]:
    """One row per model: the best setting per task (mode None) or the best of one mode."""
    lines = []
    for key, label in MODELS:
        if (data := row_results(results, key, seeds)) is None:
            continue
        pre = data.get("pretrained") or {}
        cells, columns, counts = [], [], set()
        for task, metric in COLUMNS:
            best = best_setting(data, task, mode)
            cells.append(cell(best, metric, f" ({best['mode'][0]})" if best and mode is None else "")[0])
            columns.append(per_seed(data, task, best, metric))
            counts |= set() if best is None else {best["seeds"]}
        if mode and not counts:
            continue                                                # no run in this mode (the anchor: full only)
        epoch = pre.get("epoch")
        lo, hi = (min(counts), max(counts)) if counts else (None, None)
        head = [label] + ([mode] if mode else []) + ["-" if epoch is None else f"{epoch:.0f}", perf_cell(data),
                                                     "-" if lo is None else f"{lo}" if lo == hi else f"{lo}-{hi}"]
        lines.append("| " + " | ".join(head + cells + [average_cell(columns)]) + " |")
    return lines


def glue_claims(results: Path, seeds: list[int] | None, mode: str | None) -> str:
    """CLAIMS within this one pretraining: differences of the Avg column (the better mode per task, or one
    mode), unrounded, for the rows whose every task is in."""
    averages = {}
    for key, _ in MODELS:
        if (data := row_results(results, key, seeds)) is not None:
            columns = [per_seed(data, task, best_setting(data, task, mode), metric) for task, metric in COLUMNS]
            if all(columns):
                averages[key] = float(np.mean([np.mean(list(c.values())) for c in columns]))
    labels = dict(MODELS)
    shown = [f"{claim} {labels[row]} − {labels[other]} {averages[row] - averages[other]:+.2f}"
             for claim, row, other in CLAIMS if row in averages and other in averages]
    if "teacher" in averages and "scratch" in averages:
        shown.append(f"the teacher over the floor (no pretraining) {averages['teacher'] - averages['scratch']:+.2f}")
    return (f"claims in this pretraining, {mode or 'the better mode per task'} (Avg differences; the paper's way: "
            "(b) below 0, (c) above 0): " + "; ".join(shown)) if shown else ""


def glue_tables(results: Path, seeds: list[int] | None = None) -> str:
    heads = [f"{t} {m}" for t, m in COLUMNS] + ["Avg"]
    out = ["| Model | Pre-train epochs | Pre-Train Perf. | seeds | " + " | ".join(heads) + " |",
           "|" + "---|" * (len(heads) + 4)] + glue_rows(results, None, seeds)
    out += ["", "| Model | mode | Pre-train epochs | Pre-Train Perf. | seeds | " + " | ".join(heads) + " |",
            "|" + "---|" * (len(heads) + 5)]
    for mode in ("full", "adapter"):
        out += glue_rows(results, mode, seeds)
    return "\n".join(out + ["", "seeds: how many seeds each cell averages (a range where tasks differ); "
                                 "Avg only once every task is in; every ± is the population std (ddof=0) over the fine-tuning seeds, for Avg of each seed's average where all tasks have "
                                 "the same seeds; (f)/(a): the better mode was full/adapter."]
               + [line for mode in (None, "full", "adapter") if (claims := glue_claims(results, seeds, mode))
                  for line in ("", claims)])


def ood_table(root: Path) -> str:
    """Table 4 of one pretraining: root/ood.json (results/ood.py), a row per model."""
    f = root / "ood.json"
    if not f.is_file():
        return ""
    data = json.loads(f.read_text())
    out = ["| Model | " + " | ".join(short for _, short in OOD) + " |", "|" + "---|" * (len(OOD) + 1)]
    for path, row in data["results"].items():
        out.append(f"| {Path(path).stem} | " + " | ".join(
            "-" if row.get(name, {}).get("log_likelihood") is None else f"{row[name]['log_likelihood']:.3f}"
            for name, _ in OOD) + " |")
    return "\n".join(out + ["", data.get("legend", "")])


OOD_ROLES = ("vanilla", "perf", "tcd", "epoch")     # run.sh's ood(): --ckpt VANILLA PERF TCD EPOCH, in this order


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error, std (ddof=1) / √n, over pretrainings."""
    return float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(len(values)))


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided confidence interval for the mean over pretrainings: mean ± t(n-1) · s.e. (Student's t, since
    a handful of pretrainings gives a poor estimate of the spread)."""
    mean, se = mean_se(values)
    half = float(student_t.ppf((1 + level) / 2, df=len(values) - 1)) * se
    return mean - half, mean + half


def ood_claims_table(results: Path) -> str:
    """Claim (d) over pretrainings, per Pile subset: TCD − the performance-aligned MoE and vanilla − TCD
    (the paper: vanilla ≳ MoE + TCD > MoE), within each pretraining's Table 4, mean ± s.e. over them."""
    names, per_pretraining = [], []
    for p in pretrainings(results):
        f = p.root / "ood.json"
        rows = list(json.loads(f.read_text())["results"].values()) if f.is_file() else []
        if len(rows) == len(OOD_ROLES):
            names.append(p.name)
            per_pretraining.append(dict(zip(OOD_ROLES, rows)))
    if len(per_pretraining) < 2:
        return ""
    out = []
    for subset, short in OOD:
        cells = []
        for better, worse in (("tcd", "perf"), ("vanilla", "tcd")):
            diffs = [t[better][subset]["log_likelihood"] - t[worse][subset]["log_likelihood"] for t in per_pretraining]
            mean, se = mean_se(diffs)
            cells += [", ".join(f"{d:+.3f}" for d in diffs), f"{mean:+.3f} ± {se:.3f}"]
        out.append(f"| {short} | " + " | ".join(cells) + " |")
    heads = ["subset", "TCD − perf-aligned MoE", "mean ± s.e.", "vanilla − TCD", "mean ± s.e."]
    return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)] + out + [
        "", f"masked-LM log-likelihood differences within each pretraining's Table 4 ({', '.join(names)}); "
            "the paper's way: both above 0 (vanilla ≳ MoE + TCD > MoE)"])


FIGURE5_SETTING = {"mode": "full", "lr": 5e-5}      # run.sh's Figure 5 fine-tuning


def figure5_points(results: Path) -> dict:
    """{model: {epoch: (MRPC acc mean, std, Pre-Train Perf.)}} for every kept checkpoint fine-tuned on
    MRPC with Figure 5's setting, from figure5/ and from finetune/ (run.sh does not fine-tune a
    checkpoint twice: the four of Tables 1-2 are read from there)."""
    points = {}
    for model, epoch, chosen, perf in _figure5_settings(results):
        points.setdefault(model, {})[epoch] = (chosen["mean"]["acc"], chosen["std"]["acc"], perf)
    return points


def figure5_seeds(results: Path) -> list[int]:
    """How many fine-tuning seeds Figure 5's points average, each count once (sorted)."""
    return sorted({chosen["seeds"] for _, _, chosen, _ in _figure5_settings(results)})


def _figure5_settings(results: Path):
    """(model, epoch, the Figure 5 setting's summary, Pre-Train Perf.) of every kept checkpoint."""
    for f in sorted(results.glob("figure5/*.json")) + sorted(results.glob("finetune/*.json")):
        data = json.loads(f.read_text())
        name = Path(data.get("ckpt") or f.name).stem
        settings = data["summary"].get("MRPC", {}).get("settings", [])
        chosen = [s for s in settings if all(s[k] == v for k, v in FIGURE5_SETTING.items())]
        if ".epoch" in name and chosen:
            model, epoch = name.split(".epoch")
            yield model, int(epoch), chosen[0], (data.get("pretrained") or {}).get("pretrain_perf")


def figure5_table(results: Path) -> str:
    rows = figure5_points(results)
    if not rows:
        return ""
    epochs = sorted({e for r in rows.values() for e in r})
    out = ["| Model | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "|" + "---|" * (len(epochs) + 1)]
    for model, r in rows.items():
        out.append(f"| {model} | " + " | ".join(f"{r[e][0]:.2f} ± {r[e][1]:.2f} ({r[e][2]:.2f})" if e in r and r[e][2] is not None
                                                  else "-" for e in epochs) + " |")
    return "\n".join(out + ["", "MRPC dev accuracy, full fine-tuning at lr 5e-5, mean ± population std (ddof=0) over seeds (Pre-Train Perf.)"])


def setting(run: dict) -> tuple:
    return run["adapter"], run["lr"], run["seed"]


def same_settings(runs: list[dict], settings: set[tuple]) -> list[dict]:
    """The runs with one of these (adapter, lr, seed) settings."""
    return [r for r in runs if setting(r) in settings]


def column_means(runs: list[dict]) -> list[float]:
    """Per column of Tables 1-2, the mean best-epoch value over the runs on its task (nan where none)."""
    return [np.mean([r["best"][metric] for r in runs if r["task"] == task] or [np.nan]) for task, metric in COLUMNS]


def retrain_table(results: Path) -> str:
    """The models of Tables 1-2 pretrained again by the same command (float noise: another machine, other
    reductions) and fine-tuned with some of the same settings and seeds (probes/retrain/NAME.json), against
    the runs with those settings and seeds in finetune/NAME.json: how far a second pretraining moves a row."""
    out = []
    for key, label in MODELS:
        again, first = results / "probes" / "retrain" / f"{key}.json", results / "finetune" / f"{key}.json"
        if not (again.is_file() and first.is_file()):
            continue
        new, old = json.loads(again.read_text()), json.loads(first.read_text())
        old = {**old, "runs": same_settings(old["runs"], {setting(r) for r in new["runs"]})}
        pair = [column_means(d["runs"]) for d in (old, new)]
        avg = [np.mean(values) for values in pair]
        out.append(f"| {label} | {perf_cell(old)} → {perf_cell(new)} | " + " | ".join(
            f"{a:.2f} → {b:.2f}" for a, b in zip(*pair)) + f" | {avg[0]:.2f} → {avg[1]:.2f} ({avg[1] - avg[0]:+.2f}) |")
    if not out:
        return ""
    heads = ["Model", "Pre-Train Perf."] + [f"{t} {m}" for t, m in COLUMNS] + ["Avg"]
    return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)] + out + [
        "", "first run → pretrained again by the same command; the same fine-tuning settings and seeds on both sides"])


REPLICATE_SETTING = (0, 5e-5, 1)   # (adapter, lr, seed): run.sh's full fine-tuning, seed 1, the one every pretraining has


def replicate_average(path: Path) -> float | None:
    """The five-task average of REPLICATE_SETTING's runs in a finetune.py results file; None until every task is in."""
    if not path.is_file():
        return None
    values = column_means(same_settings(json.loads(path.read_text())["runs"], {REPLICATE_SETTING}))
    return None if np.isnan(values).any() else float(np.mean(values))


class Pretraining(NamedTuple):
    name: str          # first, again, seedN
    root: Path         # where its Table 4 (ood.json) is
    finetune: Path     # its finetune.py results (teacher.json, moe_perf.json, ...)
    curves: Path       # its pretraining curves (vanilla.jsonl, moe.jsonl, moe_tcd.jsonl)


def first_name(results: Path) -> str:
    """The name of the pretraining that fills `results` itself: "first", or seedN where `results` is one
    replicate's directory (tables.py --results results/replicates/seedN writes that replicate's tables)."""
    return results.name if results.parent.name == "replicates" and results.name.startswith("seed") else "first"


def pretrainings(results: Path) -> list[Pretraining]:
    """Every pretraining of the rerun's models: the first, the same command again (probes/retrain/), and
    the replicates with other pretraining seeds (run.sh with PRETRAIN_SEED=N, replicates/seedN/)."""
    again = results / "probes" / "retrain"
    return [Pretraining(first_name(results), results, results / "finetune", results / "pretrain"),
            Pretraining("again", again, again, again / "pretrain")] + [
        Pretraining(d.name, d, d / "finetune", d / "pretrain") for d in sorted((results / "replicates").glob("seed*"))]


def pretraining_averages(results: Path) -> tuple[list[str], dict[str, dict[str, float | None]]]:
    """Each pretrained row's REPLICATE_SETTING average after every pretraining of it: the first (finetune/),
    the same command again (probes/retrain/) and the replicates with other pretraining seeds (run.sh with
    PRETRAIN_SEED=N), as (pretraining names, {row key: {pretraining: average or None}})."""
    sources = pretrainings(results)
    return [p.name for p in sources], {key: {p.name: replicate_average(p.finetune / f"{key}.json") for p in sources}
                                       for key, _ in MODELS[2:]}


def replicates_table(results: Path) -> str:
    """Each row of Tables 1-2 over every pretraining of it, with mean ± std over the pretrainings."""
    names, averages = pretraining_averages(results)
    names = [n for n in names if any(averages[key][n] is not None for key, _ in MODELS[2:])]  # drop: none done yet
    out = []
    for key, label in MODELS[2:]:                                   # the pretrained rows
        row = [averages[key][n] for n in names]
        got = [v for v in row if v is not None]
        if len(got) > 1:
            out.append(f"| {label} | {len(got)} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in row)
                       + f" | {np.mean(got):.2f} ± {np.std(got, ddof=1):.2f} |")
    if not out:
        return ""
    heads = ["Model", "pretrainings"] + names + ["mean ± std"]
    return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)] + out + [
        "", "five-task average of full fine-tuning at lr 5e-5, seed 1, after each pretraining; std over pretrainings (ddof=1)"])


# (claim, row, the row it is compared with): the paper says the difference is positive for (c), negative for (b)
CLAIMS = [("(b)", "moe_perf", "teacher"), ("(b)", "moe_epoch", "teacher"),
          ("(c)", "moe_tcd", "moe_perf"), ("(c)", "moe_tcd", "moe_epoch"), ("(c)", "moe_tcd", "teacher")]
PAPER_SIGN = {"(b)": -1, "(c)": 1}                                 # the side of 0 the paper says each falls on


def claim_differences(results: Path) -> list[tuple[str, str, str, list[str], list[float]]]:
    """Each difference of CLAIMS between two rows' averages, taken within one pretraining (the student is
    taught by its own pretraining's teacher), as (claim, row, other row, pretraining names, differences),
    over the pretrainings that have both rows."""
    names, averages = pretraining_averages(results)
    out = []
    for claim, row, other in CLAIMS:
        both = [n for n in names if averages[row][n] is not None and averages[other][n] is not None]
        out.append((claim, row, other, both, [averages[row][n] - averages[other][n] for n in both]))
    return out


def claims_table(results: Path) -> str:
    """Claims (b) and (c) over pretrainings: each difference of claim_differences, mean ± standard error over
    the pretrainings that have both rows, and how many of them point the paper's way."""
    labels, out = dict(MODELS), []
    for claim, row, other, _, diffs in claim_differences(results):
        if len(diffs) < 2:
            continue
        sign = PAPER_SIGN[claim]
        mean, se = mean_se(diffs)
        low, high = t_interval(diffs)
        out.append(f"| {claim} | {labels[row]} − {labels[other]} | {len(diffs)} | " + ", ".join(f"{d:+.2f}" for d in diffs)
                   + f" | {mean:+.2f} ± {se:.2f} | {low:+.2f} to {high:+.2f} | {sum(sign * d > 0 for d in diffs)} of {len(diffs)} |")
    if not out:
        return ""
    return "\n".join(["| claim | difference | pretrainings | per pretraining | mean ± s.e. | 95% interval | the paper's way |",
                      "|" + "---|" * 7] + out + [
        "", "differences of the averages above, within each pretraining; s.e. = std (ddof=1) / √n; 95% interval: "
            "mean ± t(n-1) s.e.; the paper's way: (b) below 0, (c) above 0"])


def pretrainings_for(std: float, half_width: float, level: float = 0.95) -> int:
    """How many pretrainings a difference with this spread needs for its t-interval to be ± half_width."""
    n = 2
    while n < 10_000 and student_t.ppf((1 + level) / 2, n - 1) * std / np.sqrt(n) > half_width:
        n += 1
    return n


def claims_spread_table(results: Path) -> str:
    """How far one pretraining moves each claim: its spread, the mean without the first pretraining (the one
    Tables 1-2 were fine-tuned on with 3 seeds), the mean without the pretraining that moves it most, and the
    pretrainings a ±0.5-point 95% interval would take at this spread."""
    labels, out = dict(MODELS), []
    for claim, row, other, names, diffs in claim_differences(results):
        if len(diffs) < 3:
            continue
        std = float(np.std(diffs, ddof=1))
        later = [d for n, d in zip(names, diffs) if n != "first"]
        without = [[d for j, d in enumerate(diffs) if j != i] for i in range(len(diffs))]
        most = max(range(len(diffs)), key=lambda i: abs(np.mean(without[i]) - np.mean(diffs)))
        mean, se = mean_se(without[most])
        out.append(f"| {claim} | {labels[row]} − {labels[other]} | {std:.2f} | {np.mean(later):+.2f} | "
                   f"{names[most]}: {mean:+.2f} ± {se:.2f} | {pretrainings_for(std, 0.5)} |")
    if not out:
        return ""
    return "\n".join(["| claim | difference | std over pretrainings | mean without the first | without the one that "
                      "moves the mean most: mean ± s.e. | pretrainings for a ±0.5 interval |", "|" + "---|" * 6] + out + [
        "", "std: ddof=1; ±0.5 interval: the n at which t(n-1) std / √n = 0.5 at this spread"])


TEACHER_EPOCH, STUDENT_EPOCH, SHARED_EPOCH = 3, 3, 6      # run.sh: TEACHER_EPOCHS, TCD_EPOCHS, MOE_EPOCHS


def epoch_perfs(curve: Path) -> dict[int, float]:
    """{epoch: Pre-Train Perf. at its end} of a pretrain.py metrics file; {} if there is none."""
    return {e: -loss for e, (loss, _) in epoch_losses(curve).items()} if curve.is_file() else {}


# ----------------------------------------------------------------------------- the other remedies (run.sh stage 9)
# each arm's rows, as run.sh --arms writes them into <pretraining>/arms/finetune/
ARMS = {"moe_ec": "expert-choice MoE", "moe_mode": "MoE + MoDE (our reading)"}
# (question, row, other row): rows from the arm's finetune/ or, for the others, its pretraining's Tables 1-2 rows
ARM_DIFFERENCES = [("remedy", "moe_ec_perf", "moe_perf"), ("remedy", "moe_mode_perf", "moe_perf"),
                   ("remedy", "moe_ec_epoch", "moe_epoch"), ("remedy", "moe_mode_epoch", "moe_epoch"),
                   ("teacher adds", "moe_tcd", "moe_ec_perf"), ("teacher adds", "moe_tcd", "moe_mode_perf"),
                   ("vs teacher", "moe_ec_perf", "teacher"), ("vs teacher", "moe_mode_perf", "teacher")]
ARM_LABELS = {"moe_ec_perf": "expert choice, perf-aligned", "moe_ec_epoch": "expert choice, epoch-aligned",
              "moe_mode_perf": "MoE + MoDE, perf-aligned", "moe_mode_epoch": "MoE + MoDE, epoch-aligned"}


def arms_sets(results: Path) -> dict[str, Path]:
    """{pretraining name: its arms/ directory}: results/arms belongs to "again" (seed 0 pretrained by the same
    command, whose TCD student the arms are aligned to, as Table 3's), or to the first pretraining where there
    is no "again" (a fresh run, the quick demo; seedN in a replicate's own directory); replicates/seedN/arms
    to seedN."""
    again = (results / "probes" / "retrain" / "pretrain" / "moe_tcd.jsonl").is_file()   # run.sh aligns to it, if there
    sets = {"again" if again else first_name(results): results / "arms"} if (results / "arms").is_dir() else {}
    sets.update({d.parent.name: d for d in sorted((results / "replicates").glob("seed*/arms")) if d.is_dir()})
    return sets


def arm_rows(results: Path) -> dict[str, dict[str, float | None]]:
    """{pretraining: {row key: five-task average}} for the arms' rows and the Tables 1-2 rows they are compared with."""
    sources = {p.name: p for p in pretrainings(results)}
    out = {}
    for name, d in arms_sets(results).items():
        rows = {key: replicate_average(d / "finetune" / f"{key}.json") for key in ARM_LABELS}
        if name in sources:
            rows.update({key: replicate_average(sources[name].finetune / f"{key}.json") for key, _ in MODELS[2:]})
        out[name] = rows
    return out


def arms_premise(results: Path) -> list[tuple[str, list[str], list[float]]]:
    """Does each arm pretrain better than vanilla at equal epochs? (arm, pretrainings, arm − vanilla Pre-Train Perf.
    at claim (a)'s epoch: the top-1 MoE's last, 6 in run.sh, even where an arm went on to reach TCD; else the
    last epoch both reached)."""
    sources, out = {p.name: p for p in pretrainings(results)}, []
    for arm in ARMS:
        names, diffs = [], []
        for name, d in arms_sets(results).items():
            mine = epoch_perfs(d / "pretrain" / f"{arm}.jsonl")
            curves = sources[name].curves if name in sources else None
            vanilla = epoch_perfs(curves / "vanilla.jsonl") if curves else {}
            shared = set(mine) & set(vanilla)
            moe_epochs = set(epoch_perfs(curves / "moe.jsonl")) if curves else set()
            at = max(shared & moe_epochs) if shared & moe_epochs else max(shared, default=None)
            if at is not None:
                names.append(name)
                diffs.append(mine[at] - vanilla[at])
        out.append((arm, names, diffs))
    return out


def arms_unreached(results: Path) -> list[str]:
    """"ARM in NAME (epoch E)" for each pretraining where an arm never reached its TCD student's Pre-Train Perf.
    (run.sh's align-ARM-perf.json says "reached": false): it has no perf-aligned rows there."""
    out = []
    for name, d in arms_sets(results).items():
        for arm, label in ARMS.items():
            path = d / f"align-{arm}-perf.json"
            record = json.loads(path.read_text()) if path.is_file() else {}
            if record.get("reached") is False:
                out.append(f"{label} in {name} (epoch {record['epochs']})")
    return out


def verdict(diffs: list[float]) -> str:
    """Shown only where the 95% interval leaves 0 out."""
    if len(diffs) < 2:
        return "one pretraining: no verdict"
    low, high = t_interval(diffs)
    return "above 0" if low > 0 else "below 0" if high < 0 else "not shown"


def arms_table(results: Path) -> str:
    """Expert choice and MoDE beside TCD, within each pretraining: the premise (Pre-Train Perf., nats) and the
    GLUE differences (five-task averages, full fine-tuning at lr 5e-5, seed 1), mean ± s.e., 95% interval."""
    rows, labels = arm_rows(results), {**dict(MODELS), **ARM_LABELS}
    out = []
    for arm, names, diffs in arms_premise(results):
        if diffs:
            out.append(arm_line(f"premise: {ARMS[arm]} − vanilla, Pre-Train Perf. at equal epochs", names, diffs, 3))
    for question, row, other in ARM_DIFFERENCES:
        names = [n for n, r in rows.items() if r.get(row) is not None and r.get(other) is not None]
        if names:
            out.append(arm_line(f"{question}: {labels[row]} − {labels[other]}", names,
                                [rows[n][row] - rows[n][other] for n in names], 2))
    if not out:
        return ""
    unreached = arms_unreached(results)
    return "\n".join(["| difference | pretrainings | per pretraining | mean ± s.e. | 95% interval | above 0 | verdict |",
                      "|" + "---|" * 7] + out + [
        "", "within each pretraining; the premise in nats (above 0: the arm pretrains better), the rest in GLUE points "
            "(five-task average, full fine-tuning at lr 5e-5, seed 1); s.e. = std (ddof=1) / √n; 95% interval: "
            "mean ± t(n-1) s.e.; verdict: which side of 0 the interval lies on, if one"] + (
        ["", "never reached its TCD student's Pre-Train Perf., so no perf-aligned rows there: " + "; ".join(unreached)]
        if unreached else []))


def arm_line(label: str, names: list[str], diffs: list[float], digits: int) -> str:
    f = lambda v: f"{v:+.{digits}f}"
    if len(diffs) > 1:
        mean, se = mean_se(diffs)
        low, high = t_interval(diffs)
        stats = f"{f(mean)} ± {se:.{digits}f} | {f(low)} to {f(high)}"
    else:
        stats = f"{f(diffs[0])} | -"
    return (f"| {label} | {len(diffs)} ({', '.join(names)}) | {', '.join(map(f, diffs))} | {stats} | "
            f"{sum(d > 0 for d in diffs)} of {len(diffs)} | {verdict(diffs)} |")


def pretraining_table(results: Path) -> str:
    """The premises over pretrainings, Pre-Train Perf. only: is the teacher weaker than its TCD student, is
    MoE ahead of vanilla at equal epochs (claim a), and which MoE epoch performance alignment picks; a last
    row gives each difference's mean ± s.e. over the pretrainings that have it."""
    out, columns = [], [[], [], [], []]     # student − teacher, MoE − vanilla at both epochs, lead over TCD
    for name, _, _, curves in pretrainings(results):
        vanilla, moe, tcd = (epoch_perfs(curves / f"{run}.jsonl") for run in ("vanilla", "moe", "moe_tcd"))
        if TEACHER_EPOCH not in vanilla or STUDENT_EPOCH not in tcd:
            continue
        teacher, student = vanilla[TEACHER_EPOCH], tcd[STUDENT_EPOCH]
        values = [student - teacher] + [moe[e] - vanilla[e] if e in moe and e in vanilla else None
                                        for e in (TEACHER_EPOCH, SHARED_EPOCH)]
        try:                                                          # align.py's rule: the closest at least as good
            chosen, _ = align(target={"pretrain_perf": student}, by="perf", epoch=None,
                              candidates=[{"epoch": e, "pretrain_perf": v} for e, v in moe.items()])
            aligned = f"epoch {chosen['epoch']} ({chosen['pretrain_perf']:.3f})"
            values.append(chosen["pretrain_perf"] - student)
        except AlignError:                                            # no MoE epoch yet, or none as good as TCD
            aligned = "-"
            values.append(None)
        for column, value in zip(columns, values):
            if value is not None:
                column.append(value)
        cells = ["-" if v is None else f"{v:+.3f}" for v in values]
        out.append(f"| {name} | {teacher:.3f} | {student:.3f} | " + " | ".join(cells[:3] + [aligned, cells[3]]) + " |")
    if not out:
        return ""
    means = ["-" if len(c) < 2 else "{:+.3f} ± {:.3f}".format(*mean_se(c)) for c in columns]
    out.append("| mean ± s.e. | | | " + " | ".join(means[:3] + ["", means[3]]) + " |")
    heads = ["pretraining", f"teacher (vanilla, epoch {TEACHER_EPOCH})", f"TCD student (epoch {STUDENT_EPOCH})",
             "student − teacher", f"MoE − vanilla, epoch {TEACHER_EPOCH}", f"MoE − vanilla, epoch {SHARED_EPOCH}",
             "perf-aligned MoE", "its lead over TCD"]
    return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)] + out + [
        "", "Pre-Train Perf. (closer to 0 is better); the paper's setting: every difference above 0"])


# Table 3 (the paper: H=128, at aligned Pre-Train Perf.): the relation constraints added one site at a time. run.sh's
# stage 8 writes MoE + T and MoE + T, I, A to table3/; the MoE and T, I rows are Tables 1-2's perf-aligned MoE and TCD.
TABLE3_ROWS = [("moe_perf", "MoE BERT (perf-aligned)"), ("moe_t", "+ T"), ("moe_tcd", "+ T, I (TCD)"),
               ("moe_tia", "+ T, I, A")]
TABLE3_STEPS = [("T", "moe_t", "moe_perf"), ("I", "moe_tcd", "moe_t"), ("A", "moe_tia", "moe_tcd")]
TABLE3_PAPER_SIGN = {"T": 1, "I": 1, "A": -1}     # the paper at H=128: T and I help, A hurts (so λA = 0 there)
# The paper's Table 3 at H=128 (Pre-Train Perf. ≈ -2.56), its seven dev columns per row
PAPER_TABLE3 = {"moe_perf": [79.75, 85.75, 81.83, 81.56, 71.33, 72.82, 83.53],
                "moe_t": [80.33, 86.05, 82.53, 82.21, 74.77, 75.72, 84.61],
                "moe_tcd": [83.70, 88.42, 83.07, 82.80, 76.37, 77.14, 85.49],
                "moe_tia": [82.87, 88.02, 82.96, 82.74, 75.45, 76.25, 85.40]}


def teacher_perf(curve: Path) -> float | None:
    """A vanilla run's Pre-Train Perf. at the teacher's epoch, from its metrics file."""
    return epoch_perfs(curve).get(TEACHER_EPOCH)


def table3_sets(results: Path) -> tuple[dict[str, Path], list[str]]:
    """({pretraining: its table3/ directory}, notes). A table3/ (results/table3, replicates/seedN/table3) belongs
    to the pretraining whose teacher has the Pre-Train Perf. of the teacher beside it (to 1e-6): its TCD row must
    come from the same teacher as its variants. One that matches none is left out, with a note."""
    teachers = {p.name: teacher_perf(p.curves / "vanilla.jsonl") for p in pretrainings(results)}
    paired, notes = {}, []
    for d in [results / "table3", *sorted((results / "replicates").glob("seed*/table3"))]:
        perf = teacher_perf(d / "teacher.jsonl")
        if perf is None:
            continue
        match = [n for n, v in teachers.items() if v is not None and abs(v - perf) < 1e-6]
        if match:
            paired[match[0]] = d
        else:
            notes.append(f"{d.relative_to(results)}: its teacher ({perf:.4f}) is no pretraining's teacher; left out")
    return paired, notes


def table3_rows(results: Path, paired: dict[str, Path]) -> dict[str, dict[str, tuple[float | None, float | None]]]:
    """{pretraining: {row key: (GLUE average of REPLICATE_SETTING or None, Pre-Train Perf. or None)}} for the
    table3/ directories of table3_sets."""
    sources = {p.name: p for p in pretrainings(results)}
    out = {}
    for name, d in paired.items():
        out[name] = {}
        for key, _ in TABLE3_ROWS:
            f = (d if key in ("moe_t", "moe_tia") else sources[name].finetune) / f"{key}.json"
            perf = (json.loads(f.read_text()).get("pretrained") or {}).get("pretrain_perf") if f.is_file() else None
            out[name][key] = (replicate_average(f), perf)
    return out


def table3_differences(rows: dict) -> list[tuple[str, str, str, list[str], list[float], list[float]]]:
    """Each added site's GLUE difference within a pretraining, over the table3_rows pretrainings that have both
    rows, as (site, row, other row, pretraining names, GLUE differences, Pre-Train Perf. differences)."""
    out = []
    for site, row, other in TABLE3_STEPS:
        both = [n for n, r in rows.items() if r[row][0] is not None and r[other][0] is not None]
        if both:
            perf = [rows[n][row][1] - rows[n][other][1] for n in both
                    if rows[n][row][1] is not None and rows[n][other][1] is not None]
            out.append((site, row, other, both, [rows[n][row][0] - rows[n][other][0] for n in both], perf))
    return out


def table3(results: Path) -> str:
    """Table 3 per pretraining (GLUE average, Pre-Train Perf. in brackets), then each added site's difference
    within a pretraining over the pretrainings that have both rows: mean ± s.e., 95% interval, k of n."""
    paired, notes = table3_sets(results)
    rows = table3_rows(results, paired)
    if not rows:
        return "\n".join(notes)
    show = lambda v: "-" if v[0] is None else f"{v[0]:.2f}" + ("" if v[1] is None else f" ({v[1]:.3f})")
    out = ["| pretraining | " + " | ".join(label for _, label in TABLE3_ROWS) + " |", "|" + "---|" * (len(TABLE3_ROWS) + 1)]
    out += [f"| {name} | " + " | ".join(show(r[key]) for key, _ in TABLE3_ROWS) + " |" for name, r in rows.items()]
    out += ["", "| site added | difference | pretrainings | per pretraining | mean ± s.e. | 95% interval | "
            "the paper's way (H=128) | Pre-Train Perf. difference, mean |", "|" + "---|" * 8]
    labels = dict(TABLE3_ROWS)
    for site, row, other, _, diffs, perf in table3_differences(rows):
        mean, se = mean_se(diffs) if len(diffs) > 1 else (diffs[0], None)
        spread = "-" if se is None else "{:+.2f} to {:+.2f}".format(*t_interval(diffs))
        way = sum(TABLE3_PAPER_SIGN[site] * d > 0 for d in diffs)
        out.append(f"| {site} | {labels[row]} − {labels[other]} | {len(diffs)} | " + ", ".join(f"{d:+.2f}" for d in diffs)
                   + f" | {mean:+.2f}" + ("" if se is None else f" ± {se:.2f}") + f" | {spread} | {way} of {len(diffs)} | "
                   + ("-" if not perf else f"{np.mean(perf):+.3f}") + " |")
    return "\n".join(out + [""] + notes + [
        "the paper (H=128), the same differences of its Table 3 rows' seven-column means: " + ", ".join(
            f"{site} {np.mean(PAPER_TABLE3[row]) - np.mean(PAPER_TABLE3[other]):+.2f}" for site, row, other in TABLE3_STEPS),
        "GLUE: five-task average of full fine-tuning at lr 5e-5, seed 1 (the replicates' setting); (Pre-Train Perf.); "
        "the paper's way: T and I above 0, A below 0; a Pre-Train Perf. difference above 0: the row pretrains better "
        "than the one it is compared with, which favours it"])


TRANSFER = [("SST-2", "acc"), ("STS-B", "pearson"), ("STS-B", "spearman")]
BERT_VOCAB_SIZE = 30522


def transfer_table(results: Path, columns=TRANSFER) -> str:
    """The transfer probes (probe.sh transfer), best mode per task, against the floor (a probe named
    floor*) fine-tuned with the same vocabulary and model shape. With columns=COLUMNS: the probes run on
    all five tasks (--all-tasks), averaged as in Tables 1-2."""
    tasks = {task for task, _ in columns}
    files = sorted((results / "probes" / "transfer").glob("*.json"),
                   key=lambda f: (not f.stem.startswith("floor"), f.stem))     # floors first
    probes = [(f.stem, json.loads(f.read_text())) for f in files]
    probes = [(name, data) for name, data in probes if tasks <= data["summary"].keys()]
    if not probes:
        return ""
    heads = [f"{t} {m}" for t, m in columns]
    out = ["| probe | layers x H | vocab | Pre-train epoch | Pre-Train Perf. | " + " | ".join(heads) +
           " | mean | over the floor |",
           "|" + "---|" * (len(heads) + 7)]
    floors = {}                                            # (vocabulary size, shape) -> the floor's mean
    for name, data in probes:
        pre = data.get("pretrained") or {}
        vocab = pre.get("vocab_size", BERT_VOCAB_SIZE)    # files written before it was recorded: BERT's
        shape = (pre.get("num_layers"), pre.get("hidden_size"))          # (None, None) where not recorded
        cells, values = [], []
        for task, metric in columns:
            best = data["summary"][task]["best"]
            text, v = cell(best, metric, f" ({best['mode'][0]})")
            cells.append(text)
            values += [] if v is None else [v]
        mean = float(np.mean(values)) if len(values) == len(columns) else None
        is_floor = name.startswith("floor")
        if is_floor:
            floors[vocab, shape] = mean
        floor = floors.get((vocab, shape))
        gain = "-" if mean is None or floor is None or is_floor else f"{mean - floor:+.2f}"
        epoch, perf = pre.get("epoch"), pre.get("pretrain_perf")
        shape_text = "-" if None in shape else "{} x {}".format(*shape)
        out.append("| " + " | ".join([name, shape_text, f"{vocab:,}", "-" if epoch is None else f"{epoch:.0f}",
                                      "-" if perf is None else f"{perf:.3f}"] + cells +
                                     ["-" if mean is None else f"{mean:.2f}", gain]) + " |")
    return "\n".join(out)


def features_table(results: Path) -> str:
    """The frozen-feature probes (feature_probe.py): one row per checkpoint, in the files' order
    (features.json: the recipe probes, then features-*.json, e.g. the rerun's models)."""
    paths = sorted((results / "probes").glob("features*.json"), key=lambda f: (f.name != "features.json", f.name))
    if not paths:
        return ""
    out = ["| checkpoint | layers | Pre-train epoch | Pre-Train Perf. | SST-2 acc, mean vector | SST-2 acc, [CLS] "
           "| STS-B Spearman, zero-shot cosine |", "|---|---|---|---|---|---|---|"]
    for row in (row for path in paths for row in json.loads(path.read_text())):
        epoch, perf = row["epoch"], row["pretrain_perf"]
        out.append(f"| {row['ckpt']} | {row['num_layers']} | {'-' if epoch is None else f'{epoch:.0f}'} | "
                   f"{'-' if perf is None else f'{perf:.3f}'} | {row['sst2_acc_mean']:.2f} | "
                   f"{row['sst2_acc_cls']:.2f} | {row['stsb_spearman_cosine']:.2f} |")
    return "\n".join(out)


def claim_a_table(results: Path) -> str:
    """Claim (a) epoch by epoch: MoE − vanilla Pre-Train Perf. within each pretraining at epochs 1 to
    SHARED_EPOCH, the last epoch both runs of every pretraining reach."""
    out = []
    for name, _, _, curves in pretrainings(results):
        vanilla, moe = (epoch_perfs(curves / f"{run}.jsonl") for run in ("vanilla", "moe"))
        if not (vanilla and moe):
            continue
        cells = [f"{moe[e] - vanilla[e]:+.3f}" if e in vanilla and e in moe else "-" for e in range(1, SHARED_EPOCH + 1)]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if not out:
        return ""
    return "\n".join(["| pretraining | " + " | ".join(str(e) for e in range(1, SHARED_EPOCH + 1)) + " |",
                      "|" + "---|" * (SHARED_EPOCH + 1)] + out + [
        "", "MoE − vanilla Pre-Train Perf. after each epoch (above 0: MoE ahead, claim a's way)"])


PREMISE = [("vanilla", "probes/vanilla-long.jsonl"), ("MoE-8 λB 1000", "previous/section4/pretrain/moe.jsonl"),
           ("MoE-8 λB 250", "probes/moe-lb250.jsonl"), ("MoE-16 λB 250", "probes/moe16-lb250.jsonl")]


def epoch_losses(path: Path) -> dict[int, tuple[float, float]]:
    """{epoch: (held-out loss = -Pre-Train Perf. at the epoch's end, mean training MLM loss over the
    epoch's logged steps)} of a pretrain.py metrics file, for every completed epoch."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ends = {round(r["epoch"]): r for r in rows
            if r.get("valid") and r.get("epoch", 0) >= 1 and abs(r["epoch"] - round(r["epoch"])) < 1e-9}
    out = {}
    for epoch, end in ends.items():
        steps_per_epoch = end["step"] / epoch
        mlm = [r["mlm"] for r in rows if "mlm" in r and (epoch - 1) * steps_per_epoch < r["step"] <= end["step"]]
        out[epoch] = (-end["pretrain_perf"], float(np.mean(mlm)) if mlm else float("nan"))
    return out


RERUN = [("vanilla", "pretrain/vanilla.jsonl"), ("MoE", "pretrain/moe.jsonl"), ("MoE + TCD", "pretrain/moe_tcd.jsonl")]


def premise_table(results: Path, curves: list[tuple[str, str]] = PREMISE) -> str:
    """Claim (a) at equal steps: held-out and training masked-LM loss (lower is better) after each
    epoch, for vanilla and each MoE run present, up to the last epoch any MoE run reached."""
    runs = [(name, epoch_losses(results / rel)) for name, rel in curves if (results / rel).is_file()]
    moe = [losses for name, losses in runs if name != "vanilla"]
    if not moe or runs[0][0] != "vanilla":
        return ""
    last = max(max(losses, default=0) for losses in moe)
    names = [name for name, _ in runs]
    out = ["| epoch | " + " | ".join(f"held-out: {n}" for n in names) + " | " +
           " | ".join(f"train: {n}" for n in names) + " |", "|" + "---|" * (2 * len(names) + 1)]
    for epoch in range(1, last + 1):
        cells = [[f"{losses[epoch][i]:.3f}" if epoch in losses and not np.isnan(losses[epoch][i]) else "-"
                  for _, losses in runs] for i in (0, 1)]          # '-': not reached, or no loss logged in it
        out.append(f"| {epoch} | " + " | ".join(cells[0] + cells[1]) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tables.py", description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(HERE), help="directory that results/run.sh filled")
    p.add_argument("--smoke", action="store_true", help="mark the tables as a smoke test (run.sh --quick)")
    p.add_argument("--seeds", type=int, nargs="+", help="Tables 1-2 from these fine-tuning seeds only (default: all)")
    args = p.parse_args(argv)
    results = Path(args.results)
    if args.smoke:
        print(SMOKE + "\n")
    table4 = {"first": "Table 4", "again": "Table 4, its models pretrained again"}
    for title, text in (("Tables 1-2", glue_tables(results, args.seeds)),
                        *((table4.get(p.name, f"Table 4, pretraining {p.name}"), ood_table(p.root))
                          for p in pretrainings(results)),
                        ("Figure 5", figure5_table(results)),
                        ("Pretraining noise (Tables 1-2's models pretrained again)", retrain_table(results)),
                        ("Tables 1-2 over pretrainings", replicates_table(results)),
                        ("Claims (b) and (c) over pretrainings", claims_table(results)),
                        ("How far one pretraining moves each claim", claims_spread_table(results)),
                        ("Pretraining over pretrainings (the premises)", pretraining_table(results)),
                        ("Claim (a) epoch by epoch over pretrainings", claim_a_table(results)),
                        ("Claim (d) over pretrainings (Table 4)", ood_claims_table(results)),
                        ("Table 3: the relation sites one at a time", table3(results)),
                        ("The other remedies: expert choice and MoDE beside TCD", arms_table(results)),
                        ("Transfer probes", transfer_table(results)),
                        ("Transfer probes, all five tasks", transfer_table(results, COLUMNS)),
                        ("Frozen-feature probes", features_table(results)),
                        ("Pretraining (held-out and training MLM loss after each epoch)", premise_table(results, RERUN)),
                        ("Premise probes (held-out and training MLM loss after each epoch)", premise_table(results))):
        if text:
            print(f"### {title}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
