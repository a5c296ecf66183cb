"""results/: alignment picks the right checkpoint, the tables and plots read what the scripts write."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import save_checkpoint
from model import BertConfig, BertForMaskedLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "results"))
import align  # noqa: E402
import make_vocab  # noqa: E402
import tables  # noqa: E402


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    d = tmp_path_factory.mktemp("kept")
    model = BertForMaskedLM(BertConfig.preset("tiny", num_layers=1))
    for epoch, perf in ((1, -6.9), (2, -6.4), (3, -6.1), (4, -5.9)):
        save_checkpoint(d / f"moe.epoch{epoch}.pt", model, step=10 * epoch, epoch=float(epoch),
                        metrics={"pretrain_perf": perf})
    save_checkpoint(d / "tcd.pt", model, step=10, epoch=1.0, metrics={"pretrain_perf": -6.35})
    return d


def test_alignment_by_performance_and_by_epoch(kept, tmp_path, capsys):
    candidates = [str(kept / f"moe.epoch{e}.pt") for e in (1, 2, 3, 4)]
    assert align.main(["--target", str(kept / "tcd.pt"), "--candidates", *candidates,
                       "--out", str(tmp_path / "a.json")]) == 0
    # -6.4 is closest to TCD's -6.35 but worse; of those at least as good (-6.1, -5.9) -6.1 is closest
    assert capsys.readouterr().out.strip() == candidates[2]
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["chosen"]["epoch"] == 3.0 and saved["other_side"]["epoch"] == 2.0 and len(saved["candidates"]) == 4
    assert not any(c["path"].startswith("/") for c in saved["candidates"])   # repository-relative paths
    assert align.main(["--target", str(kept / "tcd.pt"), "--candidates", *candidates[:2]]) == 2
    assert "align.py: error: no candidate is at least as good" in capsys.readouterr().err
    assert align.main(["--by", "epoch", "--epoch", "3", "--candidates", *candidates]) == 0
    assert capsys.readouterr().out.strip() == candidates[2]
    assert align.main(["--by", "epoch", "--epoch", "1", "--candidates", str(tmp_path / "a.json")]) == 2
    assert "is not a pretrain.py checkpoint" in capsys.readouterr().err
    # a target known by its number (a committed curve): -6.0 lies between epochs 3 and 4
    assert align.main(["--target-perf", "-6.0", "--candidates", *candidates]) == 0
    assert capsys.readouterr().out.strip() == candidates[3]
    assert align.main(["--target-perf", "-6.0", "--target", str(kept / "tcd.pt"), "--candidates", *candidates]) == 2
    assert "not both" in capsys.readouterr().err


def test_tables_take_the_better_mode_per_task(tmp_path, capsys):
    import finetune
    runs = [{"task": "RTE", "mode": mode, "adapter": a, "lr": 1e-4, "seed": s,
             "best": {"epoch": 1, "train_loss": 0.5, "seconds": 1.0, "acc": acc + s}}
            for mode, a, acc in (("full", 0, 50.0), ("adapter", 64, 60.0)) for s in (1, 2)]
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "moe_tcd.json").write_text(json.dumps(
        {"pretrained": {"epoch": 3.0, "pretrain_perf": -5.5}, "runs": runs, "summary": finetune.summarize(runs)}))
    assert tables.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| MoE BERT w/ TCD | 3"))
    assert "61.50 ± 0.50 (a)" in row and "-5.500 | 2 |" in row              # adapter won RTE, 2 seeds
    assert row.endswith("| - |")                                           # no average over one task
    assert "| MoE BERT w/ TCD | full | 3 | -5.500 | 2 |" in out


def test_tables_leave_out_a_mode_a_model_never_ran(tmp_path, capsys):
    import finetune
    runs = [{"task": "RTE", "mode": "full", "adapter": 0, "lr": 5e-5, "seed": 1,
             "best": {"epoch": 1, "train_loss": 0.5, "seconds": 1.0, "acc": 56.0}}]
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "minilm.json").write_text(json.dumps({"runs": runs, "summary": finetune.summarize(runs)}))
    assert tables.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| all-MiniLM-L6-v2 (anchor: a well-pretrained BERT, one seed) | full | - | - | 1 | - | - | - | - | - | - | 56.00" in out
    assert "| adapter |" not in out


def test_tables_average_a_row_only_once_every_task_is_in(tmp_path, capsys):
    import finetune
    scores = {"CoLA": {"mcc": 10.0}, "MRPC": {"acc": 70.0, "f1": 80.0}, "SST-2": {"acc": 76.0},
              "STS-B": {"pearson": 20.0, "spearman": 18.0}, "RTE": {"acc": 55.0}}
    runs = [{"task": task, "mode": "full", "adapter": 0, "lr": 5e-5, "seed": s,
             "best": {"epoch": 1, "train_loss": 0.5, "seconds": 1.0, **{k: v + s for k, v in metrics.items()}}}
            for task, metrics in scores.items() for s in {"RTE": (1,), "CoLA": (1, 2)}.get(task, (1, 2, 3))]
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "teacher.json").write_text(json.dumps(
        {"pretrained": {"epoch": 3.0, "pretrain_perf": -5.1}, "runs": runs, "summary": finetune.summarize(runs)}))
    assert tables.main(["--results", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| Vanilla BERT (teacher) | 3"))
    # seed means 11.5 (CoLA, 2 seeds), 72, 82, 78, 22, 20 (3 seeds) and RTE's one seed 56: average 48.79
    assert "| -5.100 | 1-3 |" in row and "56.00 ± 0.00 (f)" in row and row.endswith("| 48.79 |")


def test_tables_average_carries_the_spread_of_each_seeds_own_average(tmp_path, capsys):
    import finetune
    scores = {"CoLA": ({"mcc": 10.0}, 1), "MRPC": ({"acc": 70.0, "f1": 80.0}, 2), "SST-2": ({"acc": 76.0}, 0),
              "STS-B": ({"pearson": 20.0, "spearman": 18.0}, 3), "RTE": ({"acc": 55.0}, -1)}
    runs = [{"task": task, "mode": "full", "adapter": 0, "lr": 5e-5, "seed": s,
             "best": {"epoch": 1, "train_loss": 0.5, "seconds": 1.0, **{k: v + slope * s for k, v in metrics.items()}}}
            for task, (metrics, slope) in scores.items() for s in (1, 2, 3)]
    runs.append({**runs[0], "lr": 1e-5, "best": {**runs[0]["best"], "mcc": -50.0}})   # a worse setting, left out
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "moe_tcd.json").write_text(json.dumps(
        {"pretrained": {"epoch": 3.0, "pretrain_perf": -4.9}, "runs": runs, "summary": finetune.summarize(runs)}))
    assert tables.main(["--results", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| MoE BERT w/ TCD | 3"))
    # seed s averages (10+70+80+76+20+18+55)/7 + s (1+2+2+0+3+3-1)/7: 47.0 + 10s/7; over s = 1, 2, 3
    # 49.86 ± 1.17 (the std of per-task stds averaged would be 1.40, of the seven means 29.5)
    assert row.endswith("| 49.86 ± 1.17 |")
    assert tables.main(["--results", str(tmp_path), "--seeds", "1", "3"]) == 0             # a snapshot: seeds 1, 3
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| MoE BERT w/ TCD | 3"))
    assert "| 2 | 12.00 ± 1.00 (f) |" in row and row.endswith("| 49.86 ± 1.43 |")        # 47 + 20/7 ± 10/7



def test_transfer_table_compares_each_probe_with_the_floor_of_its_vocabulary_and_shape(tmp_path, capsys):
    import finetune

    def write(name, epoch, sst2, pearson, spearman, vocab=None, more=(), shape=None):   # per mode: the better one is reported
        tasks = (("SST-2", {"acc": sst2}), ("STS-B", {"pearson": pearson, "spearman": spearman}), *more)
        runs = [{"task": task, "mode": mode, "adapter": a, "lr": 1e-4, "seed": 1,
                 "best": {"epoch": 1, **{k: v + shift for k, v in m.items()}}}
                for mode, a, shift in (("full", 0, 0.0), ("adapter", 64, -1.0)) for task, m in tasks]
        d = tmp_path / "probes" / "transfer"
        d.mkdir(parents=True, exist_ok=True)
        pre = {"epoch": epoch, "pretrain_perf": -5.0, **({"vocab_size": vocab} if vocab else {}),
               **({"num_layers": shape[0], "hidden_size": shape[1]} if shape else {})}
        (d / f"{name}.json").write_text(json.dumps({"pretrained": pre, "runs": runs,
                                                    "summary": finetune.summarize(runs)}))
    three = (("CoLA", {"mcc": 0.0}), ("MRPC", {"acc": 68.0, "f1": 81.0}), ("RTE", {"acc": 52.0}))
    write("floor", 0.002, 77.0, 10.0, 7.0, more=three)      # mean 31.33, BERT's vocabulary (not recorded)
    three = (("CoLA", {"mcc": 14.0}), ("MRPC", {"acc": 70.0, "f1": 80.0}), ("RTE", {"acc": 55.0}))
    write("vanilla.epoch3", 3.0, 75.0, 30.0, 29.0, more=three)   # mean 44.67
    write("floor8k", 0.002, 70.0, 5.0, 5.0, vocab=8192)     # mean 26.67
    write("a8k", 3.0, 72.0, 10.0, 11.0, vocab=8192)         # mean 31.00; sorts before both floors
    write("floor-small", 0.002, 60.0, 2.0, 1.0, shape=(12, 128))    # mean 21.00, BERT's vocabulary again
    write("small.epoch3", 3.0, 80.0, 20.0, 20.0, shape=(12, 128))   # mean 40.00
    assert tables.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| floor | - | 30,522 | 0 | -5.000 | 77.00 ± 0.00 (f) | 10.00 ± 0.00 (f) | 7.00 ± 0.00 (f) | 31.33 | - |" in out
    assert ("| vanilla.epoch3 | - | 30,522 | 3 | -5.000 | 75.00 ± 0.00 (f) | 30.00 ± 0.00 (f) | 29.00 ± 0.00 (f) "
            "| 44.67 | +13.33 |") in out
    assert "| small.epoch3 | 12 x 128 | 30,522 | 3 | -5.000 | 80.00 ± 0.00 (f) | 20.00 ± 0.00 (f) | 20.00 ± 0.00 (f) " \
        "| 40.00 | +19.00 |" in out                                     # against its own shape's floor, not 31.33
    assert "| a8k | - | 8,192 | 3 | -5.000 | 72.00 ± 0.00 (f) | 10.00 ± 0.00 (f) | 11.00 ± 0.00 (f) | 31.00 | +4.33 |" in out
    five = out[out.index("### Transfer probes, all five tasks"):]          # the seven metrics of Tables 1-2
    assert "| floor | - | 30,522 | 0 | -5.000 | 0.00 ± 0.00 (f) | 68.00 ± 0.00 (f) | 81.00 ± 0.00 (f) " in five
    assert five.count("| vanilla.epoch3 |") == 1 and "a8k" not in five         # only probes with all five
    assert "| 42.14 | - |" in five and "| 50.43 | +8.29 |" in five    # (0+68+81+77+10+7+52)/7, (14+...+55)/7


def test_premise_table_reads_each_epoch_end_and_the_mean_training_loss_within_it(tmp_path, capsys):
    """Held-out = -Pre-Train Perf. at each epoch's end (mid-epoch evaluations ignored); train = the mean
    of the logged MLM losses of that epoch only (a boundary step belongs to the epoch it ends); rows go
    to the last epoch any MoE run reached, and a run that stopped earlier shows '-'."""
    def write(rel, perfs, mlm):                       # 4 steps an epoch, a loss logged every 2 steps
        rows = [{"step": step, "mlm": loss} for step, loss in mlm]
        rows += [{"valid": True, "step": 2, "epoch": 0.5, "pretrain_perf": -9.0}]
        rows += [{"valid": True, "step": 4 * e, "epoch": float(e), "pretrain_perf": p} for e, p in enumerate(perfs, 1)]
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write("probes/vanilla-long.jsonl", [-6.5, -5.25, -5.0], [(2, 8.0), (4, 7.0), (6, 6.0), (8, 5.0), (10, 1.0), (12, 1.0)])
    write("probes/moe16-lb250.jsonl", [-6.25, -5.5], [(2, 9.0), (4, 6.0), (6, 5.5), (8, 4.5)])
    write("probes/moe-lb250.jsonl", [-6.75], [(2, 7.0), (4, 7.5)])
    assert tables.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("### Premise probes"):]
    assert ("| epoch | held-out: vanilla | held-out: MoE-8 λB 250 | held-out: MoE-16 λB 250 | train: vanilla "
            "| train: MoE-8 λB 250 | train: MoE-16 λB 250 |") in table
    assert "| 1 | 6.500 | 6.750 | 6.250 | 7.500 | 7.250 | 7.500 |" in table
    assert "| 2 | 5.250 | - | 5.500 | 5.500 | - | 5.000 |" in table
    assert "| 3 |" not in table                                  # vanilla's third epoch: no MoE run got there
    assert "### Pretraining" not in out                          # no rerun curves yet
    write("pretrain/vanilla.jsonl", [-6.5, -5.25], [(2, 8.0), (4, 7.0), (6, 6.0), (8, 5.0)])
    write("pretrain/moe_tcd.jsonl", [-6.0], [(2, 6.0), (4, 5.0)])
    assert tables.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rerun = out[out.index("### Pretraining"):out.index("### Premise probes")]
    assert "| epoch | held-out: vanilla | held-out: MoE + TCD | train: vanilla | train: MoE + TCD |" in rerun
    assert "| 1 | 6.500 | 6.000 | 7.500 | 5.500 |" in rerun and "| 2 |" not in rerun


def test_figure5_reads_its_setting_from_both_directories(tmp_path, capsys):
    import finetune

    def write(path, ckpt, accs):        # accs: {(mode, lr): [acc per seed]}
        runs = [{"task": "MRPC", "mode": mode, "adapter": 0 if mode == "full" else 64, "lr": lr, "seed": s,
                 "best": {"epoch": 1, "acc": acc, "f1": acc}} for (mode, lr), a in accs.items()
                for s, acc in enumerate(a)]
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"ckpt": ckpt, "pretrained": {"pretrain_perf": -5.0}, "runs": runs,
                                    "summary": finetune.summarize(runs)}))
    write(tmp_path / "figure5" / "moe.epoch1.json", "/r/moe.epoch1.pt", {("full", 5e-5): [60.0, 62.0]})
    write(tmp_path / "finetune" / "moe_perf.json", "/r/moe.epoch2.pt",
          {("full", 5e-5): [70.0, 70.0], ("adapter", 3e-4): [90.0, 90.0]})        # the adapter's 90 is not Fig. 5's
    write(tmp_path / "finetune" / "scratch.json", "/r/scratch.pt", {("full", 5e-5): [50.0]})  # not a kept epoch
    assert tables.figure5_points(tmp_path) == {"moe": {1: (61.0, 1.0, -5.0), 2: (70.0, 0.0, -5.0)}}
    assert tables.main(["--results", str(tmp_path)]) == 0
    assert "| moe | 61.00 ± 1.00 (-5.00) | 70.00 ± 0.00 (-5.00) |" in capsys.readouterr().out


def test_retrain_table_compares_only_the_settings_and_seeds_run_again(tmp_path, capsys):
    import finetune
    base = {"CoLA": {"mcc": 10.0}, "MRPC": {"acc": 70.0, "f1": 80.0}, "SST-2": {"acc": 76.0},
            "STS-B": {"pearson": 20.0, "spearman": 18.0}, "RTE": {"acc": 55.0}}
    shift = {"mcc": 1.0, "acc": 2.0, "f1": 0.0, "pearson": 4.0, "spearman": 0.0}     # RTE and SST-2 acc move by 2

    def runs(settings, perf, move=lambda metric: 0.0):   # perf: {seed: Pre-Train Perf. of its checkpoint}
        return [{"task": task, "mode": "full" if a == 0 else "adapter", "adapter": a, "lr": lr, "seed": seed,
                 "pretrain_perf": perf[seed],
                 "best": {"epoch": 1, **{k: v + 10 * (seed - 1) + 20 * (a > 0) + move(k) for k, v in metrics.items()}}}
                for task, metrics in base.items() for a, lr, seed in settings]

    # the first file's seed-1 runs came from a checkpoint at -5.159, its later ones from one at -5.151
    first = runs([(0, 5e-5, 1), (0, 5e-5, 2), (64, 3e-4, 1)], {1: -5.159, 2: -5.151})
    for sub, name, perf, rs in (("finetune", "teacher", -5.151, first),
                                ("probes/retrain", "teacher", -5.118, runs([(0, 5e-5, 1)], {1: -5.118}, shift.get))):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / f"{name}.json").write_text(json.dumps(
            {"pretrained": {"epoch": 3.0, "pretrain_perf": perf}, "runs": rs, "summary": finetune.summarize(rs)}))
    assert tables.main(["--results", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| Vanilla BERT (teacher) | -5"))
    # only full lr 5e-5 seed 1 on the first side: 329/7 = 47.00; moved by (1+2+0+2+4+0+2)/7 = 1.57
    assert row.startswith("| Vanilla BERT (teacher) | -5.159 → -5.118 | 10.00 → 11.00 | 70.00 → 72.00 | 80.00 → 80.00 |")
    assert row.endswith("| 55.00 → 57.00 | 47.00 → 48.57 (+1.57) |")


def test_tables_show_each_pretrain_perf_a_row_came_from():
    runs = [{"pretrain_perf": -5.1511}, {"pretrain_perf": -10.2}, {"pretrain_perf": -5.1511}, {}]
    assert tables.perf_cell({"runs": runs, "pretrained": {"pretrain_perf": -5.1511}}) == "-10.200 / -5.151"
    assert tables.perf_cell({"runs": runs[:1], "pretrained": {"pretrain_perf": -5.1590}}) == "-5.151"
    assert tables.perf_cell({"runs": [{}], "pretrained": {"pretrain_perf": -4.2}}) == "-4.200"
    assert tables.perf_cell({"runs": [], "pretrained": {}}) == "-"


def test_table4_and_its_models_pretrained_again_each_read_their_own_file(tmp_path, capsys):
    subsets = [name for name, _ in tables.OOD]
    for name, shift in (("ood.json", 0.0), ("probes/retrain/ood.json", 0.25)):
        rows = {f"ckpt/{m}.pt": {s: {"log_likelihood": -5.0 - i - j / 10 + shift} for j, s in enumerate(subsets)}
                for i, m in enumerate(("moe.epoch4", "moe_tcd.epoch3"))}
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps({"results": rows, "legend": "legend"}))
    assert tables.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    first, again = out.split("### Table 4, its models pretrained again")
    assert "| moe_tcd.epoch3 | -6.000 | -6.100 | -6.200 | -6.300 | -6.400 |" in first.split("### Table 4\n")[1]
    assert "| moe_tcd.epoch3 | -5.750 | -5.850 | -5.950 | -6.050 | -6.150 |" in again.split("###")[0]


def test_replicates_table_averages_each_pretraining_of_a_row(tmp_path, capsys):
    import finetune
    base = {"CoLA": {"mcc": 10.0}, "MRPC": {"acc": 70.0, "f1": 80.0}, "SST-2": {"acc": 76.0},
            "STS-B": {"pearson": 20.0, "spearman": 18.0}, "RTE": {"acc": 55.0}}    # average 47

    def write(sub, name, shift, tasks=tuple(base)):   # full lr 5e-5 seed 1 at 47 + shift; other settings far off
        runs = [{"task": t, "mode": "adapter" if a else "full", "adapter": a, "lr": lr, "seed": seed,
                 "best": {"epoch": 1, **{k: v + shift + 30 * (a > 0) + 20 * (seed != 1) for k, v in base[t].items()}}}
                for t in tasks for a, lr, seed in ((0, 5e-5, 2), (64, 3e-4, 1), (0, 5e-5, 1))]
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / f"{name}.json").write_text(json.dumps({"runs": runs, "summary": finetune.summarize(runs)}))

    write("finetune", "teacher", 1.0)
    write("probes/retrain", "teacher", -2.0)
    write("replicates/seed2/finetune", "teacher", 4.0)
    write("replicates/seed3/finetune", "teacher", 9.0, tasks=("CoLA", "RTE"))          # not every task yet
    write("replicates/seed4/finetune", "teacher", 9.0, tasks=("CoLA",))                # nothing finished: no column
    write("finetune", "moe_epoch", 0.0)                                              # one pretraining: no row
    write("finetune", "moe_tcd", 0.0)
    write("replicates/seed3/finetune", "moe_tcd", 2.0)
    assert tables.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out.split("### Tables 1-2 over pretrainings")[1].split("###")[0]
    assert "| Model | pretrainings | first | again | seed2 | seed3 | mean ± std |" in out
    # 48, 45 and 51: mean 48, sample std 3
    assert "| Vanilla BERT (teacher) | 3 | 48.00 | 45.00 | 51.00 | - | 48.00 ± 3.00 |" in out
    assert "| MoE BERT w/ TCD | 2 | 47.00 | - | - | 49.00 | 48.00 ± 1.41 |" in out
    assert "epoch-aligned" not in out


FIVE_TASKS = {"CoLA": {"mcc": 10.0}, "MRPC": {"acc": 70.0, "f1": 80.0}, "SST-2": {"acc": 76.0},
              "STS-B": {"pearson": 20.0, "spearman": 18.0}, "RTE": {"acc": 55.0}}    # average 47


def write_full_runs(results: Path, sub: str, name: str, shift: float, perf: float | None = None) -> None:
    """A finetune.py file of full fine-tuning (lr 5e-5): seed 1 at 47 + shift, seed 2 far off."""
    import finetune
    runs = [{"task": t, "mode": "full", "adapter": 0, "lr": 5e-5, "seed": seed,
             "best": {"epoch": 1, **{k: v + shift + 20 * (seed != 1) for k, v in FIVE_TASKS[t].items()}}}
            for t in FIVE_TASKS for seed in (2, 1)]
    data = {"runs": runs, "summary": finetune.summarize(runs)}
    if perf is not None:
        data["pretrained"] = {"pretrain_perf": perf}
    (results / sub).mkdir(parents=True, exist_ok=True)
    (results / sub / f"{name}.json").write_text(json.dumps(data))


def write_claims_fixture(results: Path) -> None:
    """Full fine-tuning (lr 5e-5) of four rows in four pretrainings, seed 1 at 47 + shift, another seed far off."""
    def write(sub, name, shift):
        write_full_runs(results, sub, name, shift)

    for sub, teacher, tcd in (("finetune", 1.0, 3.0), ("probes/retrain", -2.0, 0.0), ("replicates/seed2/finetune", 4.0, 3.0)):
        write(sub, "teacher", teacher)
        write(sub, "moe_tcd", tcd)
    write("finetune", "moe_epoch", 0.0)
    write("probes/retrain", "moe_epoch", -1.0)
    write("replicates/seed2/finetune", "moe_epoch", 2.0)
    write("replicates/seed3/finetune", "moe_epoch", 50.0)         # no teacher in seed 3: not a pair
    write("finetune", "moe_perf", 9.0)                            # one pretraining: no row


def test_claim_differences_pair_rows_within_each_pretraining(tmp_path):
    write_claims_fixture(tmp_path)
    got = {(row, other): (names, [round(d, 6) for d in diffs])
           for _, row, other, names, diffs in tables.claim_differences(tmp_path)}
    assert got[("moe_tcd", "teacher")] == (["first", "again", "seed2"], [2.0, 2.0, -1.0])
    assert got[("moe_epoch", "teacher")] == (["first", "again", "seed2"], [-1.0, 1.0, -2.0])
    assert got[("moe_tcd", "moe_epoch")] == (["first", "again", "seed2"], [3.0, 1.0, 1.0])
    assert got[("moe_perf", "teacher")] == (["first"], [8.0])


def test_claims_plot_is_drawn_from_two_pretrainings_on(tmp_path):
    pytest.importorskip("matplotlib")
    import plot
    assert plot.plot_claims(tmp_path, tmp_path / "claims.png") is False            # no fine-tuning at all
    write_claims_fixture(tmp_path)
    assert plot.plot_claims(tmp_path, tmp_path / "claims.png") is True
    assert (tmp_path / "claims.png").stat().st_size > 1000


def test_mean_se_is_the_standard_error_over_pretrainings():
    mean, se = tables.mean_se([1.0, 2.0, 6.0])          # deviations -2, -1, +3: std (ddof=1) √7, s.e. √(7/3)
    assert mean == pytest.approx(3.0) and se == pytest.approx((7 / 3) ** 0.5)


def test_t_interval_uses_students_t_with_n_minus_1_degrees_of_freedom():
    low, high = tables.t_interval([1.0, 2.0, 6.0])     # t(0.975, df 2) = 4.3027 (printed tables), not 1.96
    assert low == pytest.approx(3.0 - 4.302653 * (7 / 3) ** 0.5) and high == pytest.approx(3.0 + 4.302653 * (7 / 3) ** 0.5)
    low, high = tables.t_interval([0.5, -1.0, 2.0, 0.1], level=0.9)   # t(0.95, df 3) = 2.3534
    mean, se = tables.mean_se([0.5, -1.0, 2.0, 0.1])
    assert (low, high) == (pytest.approx(mean - 2.353363 * se), pytest.approx(mean + 2.353363 * se))


def test_claims_table_pairs_rows_within_each_pretraining(tmp_path, capsys):
    write_claims_fixture(tmp_path)
    assert tables.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out.split("### Claims (b) and (c) over pretrainings")[1].split("###")[0]
    # TCD - teacher: +2, +2, -1: mean +1, std sqrt(3), s.e. 1; two of three above 0 (the paper's way for (c))
    assert "| (c) | MoE BERT w/ TCD − Vanilla BERT (teacher) | 3 | +2.00, +2.00, -1.00 | +1.00 ± 1.00 | -3.30 to +5.30 | 2 of 3 |" in out
    # epoch-aligned - teacher: -1, +1, -2 (seed 3 has no teacher); two below 0 (the paper's way for (b))
    assert "| (b) | MoE BERT, epoch-aligned − Vanilla BERT (teacher) | 3 | -1.00, +1.00, -2.00 | -0.67 ± 0.88 | -4.46 to +3.13 | 2 of 3 |" in out
    assert "perf-aligned" not in out


def test_claims_spread_table_names_the_pretraining_that_moves_each_mean_most(tmp_path, capsys):
    write_claims_fixture(tmp_path)
    assert tables.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out.split("### How far one pretraining moves each claim")[1].split("###")[0]
    # TCD - teacher +2, +2, -1: std √3; without the first +0.50; without seed 2 the mean moves most (+1 to +2);
    # ±0.5 needs n = 49: t(0.975, 48) √3 / 7 = 0.497, while n = 48 gives 0.503
    assert "| (c) | MoE BERT w/ TCD − Vanilla BERT (teacher) | 1.73 | +0.50 | seed2: +2.00 ± 0.00 | 49 |" in out
    # epoch-aligned - teacher -1, +1, -2: without "again" the mean moves from -0.67 to -1.50, the most
    assert "| (b) | MoE BERT, epoch-aligned − Vanilla BERT (teacher) | 1.53 | -0.50 | again: -1.50 ± 0.50 | 39 |" in out
    assert "| (c) | MoE BERT w/ TCD − MoE BERT, epoch-aligned | 1.15 | +1.00 | first: +1.00 ± 0.00 | 23 |" in out


def test_pretrainings_for_a_half_width_uses_students_t():
    # std 1, ±0.5: n = 18 gives t(0.975, 17) / √18 = 2.110 / 4.243 = 0.497; n = 17 gives 2.120 / 4.123 = 0.514
    assert tables.pretrainings_for(1.0, 0.5) == 18
    # std 0.1: n = 2 gives t(0.975, 1) 0.1 / √2 = 12.71 x 0.071 = 0.90, too wide; n = 3 gives 0.25
    assert tables.pretrainings_for(0.1, 0.5) == 3 and tables.pretrainings_for(2.0, 0.5) == 64


def test_pretraining_tables_check_each_pretrainings_premises_and_claim_a_by_epoch(tmp_path, capsys):
    def curve(sub, run, perfs):      # Pre-Train Perf. at the end of epochs 1, 2, ...
        rows = [{"valid": True, "step": 10 * e, "epoch": float(e), "pretrain_perf": v} for e, v in enumerate(perfs, 1)]
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / f"{run}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    curve("pretrain", "vanilla", [-7.0, -6.0, -5.2, -5.0, -4.8, -4.7])
    curve("pretrain", "moe", [-7.0, -5.9, -4.9, -4.85, -4.78, -4.65])
    curve("pretrain", "moe_tcd", [-6.5, -5.5, -4.88])
    curve("probes/retrain/pretrain", "vanilla", [-7.0, -6.0, -5.1, -4.9, -4.8, -4.75])
    curve("probes/retrain/pretrain", "moe", [-7.0, -5.8, -5.0, -4.86, -4.82, -4.65])
    curve("probes/retrain/pretrain", "moe_tcd", [-6.5, -5.5, -4.95])
    curve("replicates/seed2/pretrain", "vanilla", [-7.0, -6.0, -5.3])     # no MoE baseline yet
    curve("replicates/seed2/pretrain", "moe_tcd", [-6.5, -5.5, -5.4])
    curve("replicates/seed3/pretrain", "vanilla", [-7.0, -6.0, -5.3])     # no student yet: no row
    curve("replicates/seed4/pretrain", "vanilla", [-7.0, -6.0])           # no teacher yet: no row
    curve("replicates/seed4/pretrain", "moe_tcd", [-6.5, -5.5, -5.0])
    assert tables.main(["--results", str(tmp_path)]) == 0
    capsys_out = capsys.readouterr().out
    out = capsys_out.split("### Pretraining over pretrainings (the premises)")[1].split("###")[0]
    # MoE epoch 3 (-4.90) is nearer TCD (-4.88) but worse: alignment takes epoch 4, the nearest at least as good
    assert "| first | -5.200 | -4.880 | +0.320 | +0.300 | +0.050 | epoch 4 (-4.850) | +0.030 |" in out
    assert "| again | -5.100 | -4.950 | +0.150 | +0.100 | +0.100 | epoch 4 (-4.860) | +0.090 |" in out
    assert "| seed2 | -5.300 | -5.400 | -0.100 | - | - | - | - |" in out
    # student − teacher: +0.32, +0.15, -0.10: mean 0.123, std 0.211, s.e. 0.122; the others over first and again
    assert "| mean ± s.e. | | | +0.123 ± 0.122 | +0.200 ± 0.100 | +0.075 ± 0.025 |  | +0.060 ± 0.030 |" in out
    assert "seed3" not in out and "seed4" not in out
    out = capsys_out.split("### Claim (a) epoch by epoch over pretrainings")[1].split("###")[0]
    # MoE − vanilla after each epoch: seed2 has no MoE baseline, so no row
    assert "| first | +0.000 | +0.100 | +0.300 | +0.150 | +0.020 | +0.050 |" in out
    assert "| again | +0.000 | +0.200 | +0.100 | +0.040 | -0.020 | +0.100 |" in out
    assert "seed2" not in out


def test_ood_claims_table_takes_differences_within_each_pretrainings_table4(tmp_path, capsys):
    subsets = [name for name, _ in tables.OOD]

    def table4(rel, lls):   # lls: log-likelihood of vanilla, perf-aligned MoE, TCD, epoch-aligned MoE (run.sh's order)
        rows = {f"ckpt/{role}.pt": {s: {"log_likelihood": ll - i / 100} for i, s in enumerate(subsets)}
                for role, ll in zip(("vanilla.epoch5", "moe.epoch4", "moe_tcd.epoch3", "moe.epoch6")[:len(lls)], lls)}
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps({"results": rows, "legend": "legend"}))

    table4("ood.json", (-5.0, -5.3, -5.1, -4.9))                       # TCD - perf +0.2, vanilla - TCD +0.1
    table4("probes/retrain/ood.json", (-5.4, -5.2, -5.1, -4.9))        # +0.1, -0.3
    table4("replicates/seed2/ood.json", (-4.9, -5.5, -5.2, -5.0))      # +0.3, +0.3
    table4("replicates/seed3/ood.json", (-5.0, -5.5))                  # not every row yet: left out
    assert tables.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    claims = out.split("### Claim (d) over pretrainings (Table 4)")[1].split("###")[0]
    # TCD - perf: +0.2, +0.1, +0.3: mean +0.2, std 0.1, s.e. 0.058; vanilla - TCD: +0.1, -0.3, +0.3: mean 0.033, s.e. 0.176
    assert "| AX | +0.200, +0.100, +0.300 | +0.200 ± 0.058 | +0.100, -0.300, +0.300 | +0.033 ± 0.176 |" in claims
    assert "(first, again, seed2)" in claims
    assert "### Table 4, pretraining seed2" in out and "### Table 4, pretraining seed3" in out


def test_plots_are_drawn_from_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    import plot
    (tmp_path / "pretrain").mkdir()
    rows = [{"valid": True, "step": s, "tokens": s * 8192, "pretrain_perf": -7 + s / 1000} for s in (250, 500)]
    (tmp_path / "pretrain" / "vanilla.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot.main(["--results", str(tmp_path)]) == 0
    assert (tmp_path / "pretrain.png").stat().st_size > 1000


def test_plot_legends_use_the_reports_names_and_show_identical_series_as_one(tmp_path, monkeypatch):
    """A smoke run's perf- and epoch-aligned MoE can be one checkpoint: drawn once, labelled with both
    names, so no series hides under another's markers; legends never show a file's internal name."""
    pytest.importorskip("matplotlib")
    import plot
    (tmp_path / "pretrain").mkdir()
    rows = lambda shift: "".join(json.dumps({"valid": True, "step": s, "tokens": s * 8192, "pretrain_perf": -7 + shift + s / 1000})
                                 + "\n" for s in (250, 500))
    for name, shift in (("vanilla", 0.0), ("moe", 0.3), ("moe_tcd", 0.3)):
        (tmp_path / "pretrain" / f"{name}.jsonl").write_text(rows(shift))
    plotted = []
    import matplotlib.axes
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: plotted.append(k.get("label")) or real(self, *a, **k))
    plot.draw(tmp_path)
    assert sorted(plotted) == ["MoE BERT = MoE BERT w/ TCD", "Vanilla BERT"]
    assert plot.merge_identical({"moe_perf": ([1], [2.0]), "moe_epoch": ([1], [2.0]), "teacher": ([1], [1.0])}) == {
        "MoE BERT, perf-aligned = MoE BERT, epoch-aligned": ((1,), (2.0,)), "Vanilla BERT (teacher)": ((1,), (1.0,))}


def test_figure5_plot_marks_the_no_pretraining_floor(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import finetune
    import plot
    runs = [{"task": "MRPC", "mode": "full", "adapter": 0, "lr": 5e-5, "seed": seed,
             "best": {"epoch": 1, "acc": acc, "f1": 80.0}} for seed, acc in ((1, 69.0), (2, 70.0))]
    (tmp_path / "figure5").mkdir()
    (tmp_path / "figure5" / "vanilla.epoch2.json").write_text(json.dumps(
        {"ckpt": "runs/vanilla.epoch2.pt", "pretrained": {"pretrain_perf": -5.5}, "runs": runs,
         "summary": finetune.summarize(runs)}))
    drawn = {}
    monkeypatch.setattr(plot, "plot_points", lambda points, x, y, out, *a: drawn.update({out.name: (points, a)}))
    plot.draw(tmp_path)
    points, (xlabel, ylabel, title, floor) = drawn["figure5.png"]
    assert points == [{"name": "vanilla", "epoch": 2, "mrpc": 69.5}] and floor is None   # no floor run: no line
    assert (xlabel, ylabel) == ("pretraining epoch", "MRPC accuracy (dev, full fine-tuning)") and "Fig. 5" in title
    assert title.endswith("(mean of 2 seeds)")                       # the seeds the points average, not a fixed 3
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "scratch.json").write_text(json.dumps({"runs": [], "summary": {}, "paper_row": {"MRPC acc": "68.46"}}))
    plot.draw(tmp_path)
    assert drawn["figure5.png"][1][-1] == 68.46


def test_hf_curve_head_on_masked_rows_is_hfs_loss_and_gradient():
    transformers = pytest.importorskip("transformers")
    import torch
    import hf_curve
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    hf = transformers.BertForMaskedLM(cfg)
    ids = torch.randint(5, 200, (3, 16))
    labels = torch.where(torch.rand(3, 16) < 0.3, ids, -100)
    full = hf(input_ids=ids, labels=labels).loss
    full.backward()
    want = {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad()
    rows = hf_curve.MaskedRowsHF(hf)(ids, labels=labels).loss
    rows.backward()
    assert abs(full.item() - rows.item()) < 1e-5
    assert max((p.grad - want[n]).abs().max().item() for n, p in hf.named_parameters() if n in want) < 1e-6


def test_hf_curve_resumes_where_it_stopped(tmp_path):
    pytest.importorskip("transformers")
    import hf_curve
    text = tmp_path / "corpus.txt"
    words = "the cat sat on a mat while its owner read the paper about mixtures of experts".split()
    text.write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(300)) for i in range(40)))
    common = ["--data", str(text), "--valid", str(text), "--batch-size", "4", "--warmup", "2", "--short-seq-steps", "2",
              "--eval-every", "2", "--valid-segments", "4", "--cache-dir", str(tmp_path / "cache")]
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    hf_curve.main(common + ["--steps", "4", "--out", str(whole), "--state", str(tmp_path / "w" / "s.pt")])
    # the first run stops at step 2 of a 4-step schedule: its state is then resumed to step 4
    hf_curve.main(common + ["--steps", "4", "--out", str(parts), "--state", str(tmp_path / "p" / "s.pt"),
                            "--stop-at", "2"])
    hf_curve.main(common + ["--steps", "4", "--out", str(parts), "--state", str(tmp_path / "p" / "s.pt")])
    a, b = ([json.loads(r) for r in f.read_text().splitlines()] for f in (whole, parts))
    assert [r["step"] for r in b] == [0, 2, 4]
    for x, y in zip(a, b):
        assert abs(x["ours"] - y["ours"]) < 1e-9 and abs(x["hf"] - y["hf"]) < 1e-9
    assert abs(a[0]["ours"] - a[0]["hf"]) < 1e-3                           # the same start


@pytest.mark.parametrize("script", ["run.sh", "probe.sh"])
def test_scripts_take_help_and_refuse_unknown_arguments(tmp_path, script):
    """--help prints the usage and starts nothing; an unknown argument is one line and exit code 2."""
    path = Path(__file__).resolve().parent.parent / "results" / script
    env = {**os.environ, "RUNS": str(tmp_path / "runs")}
    r = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "--help" in r.stdout and not (tmp_path / "runs").exists(), r.stderr
    extra = [["transfer", "n", "c.pt", "--bogus"], ["transfer", "n"]] if script == "probe.sh" else []
    for bad in (["--bogus"], ["--quick", "--full"], ["frobnicate"], *extra):
        r = subprocess.run(["bash", str(path), *bad], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error" in r.stderr, (bad, r.stderr)
    assert not (tmp_path / "runs").exists()


def test_make_vocab_fits_the_corpus_and_refuses_to_overwrite(tmp_path, capsys):
    """The vocabulary starts with BERT's special tokens ([PAD] = 0), then the rest sorted; it
    tokenizes its corpus without [UNK]; an existing --out or a missing corpus is one line, exit 2."""
    from checkpoint import make_tokenizer, read_vocab
    words = ["whale", "harpoon", "captain", "ocean", "sailor", "ship", "sea", "storm", "deck", "mast"]
    text = "\n".join(" ".join(words[(i * 7 + j * 3) % 10] + ("s" if j % 3 == 0 else "") for j in range(12)) + "."
                     for i in range(200))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text + "\n")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    assert make_vocab.main(["--data", str(corpus), "--size", "300", "--out", str(a)]) == 0
    b.write_text("kept\n")
    vocab = read_vocab(a)
    assert len(vocab) <= 300 and vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab[5:] == sorted(vocab[5:]) and len(set(vocab)) == len(vocab)
    assert "whale" in vocab and "harpoon" in vocab                # frequent words are whole tokens
    ids = make_tokenizer(vocab).encode("Captain SHIP masts seaman.").ids
    assert vocab.index("[UNK]") not in ids[1:-1] and "ship" in [vocab[i] for i in ids]
    capsys.readouterr()
    assert make_vocab.main(["--data", str(corpus), "--out", str(b)]) == 2
    assert "exists" in capsys.readouterr().err and b.read_text() == "kept\n"
    assert make_vocab.main(["--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "c.txt")]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "c.txt").exists()


def test_feature_probe_pools_real_tokens_and_fits_like_sklearn(tmp_path):
    import feature_probe
    from sklearn.linear_model import LogisticRegression
    from finetune import encode
    from checkpoint import make_tokenizer, read_vocab
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig.preset("tiny", num_layers=2)).bert.eval()
    tokenizer = make_tokenizer(read_vocab(ROOT / "data" / "bert-base-uncased-vocab.txt"))
    texts = ["a short one", "a much longer sentence with many more words in it", "mid length text here"]
    encoded = encode(tokenizer, texts, [None] * 3, 128)
    mean, cls = feature_probe.features(bert, encoded, batch_size=3)              # padded together
    for i, (ids, types) in enumerate(encoded):                                   # each alone, no padding
        hidden = bert(torch.tensor([ids]), None, torch.tensor([types])).hidden[0].float()   # (T, H)
        assert torch.allclose(mean[i], hidden.mean(0), atol=1e-5) and torch.allclose(cls[i], hidden[0], atol=1e-5)
    g = torch.Generator().manual_seed(1)                                          # noisy, unbalanced classes
    x = torch.randn(300, 5, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]) + 0.3
    y = ((x @ torch.tensor([1.0, -0.5, 2.0, 0.1, 0.0]) + torch.randn(300, generator=g)) > 0.5).long()
    train, dev, l2 = slice(0, 200), slice(200, 300), 1e-2
    ours = feature_probe.logistic_accuracy(x[train], y[train].tolist(), x[dev], y[dev].tolist(), l2=l2)
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    reference = LogisticRegression(C=1 / (2 * l2 * 200), tol=1e-10, max_iter=10_000)      # same objective
    reference.fit(((x[train] - mu) / sd).numpy(), y[train].numpy())
    expected = 100 * (reference.predict(((x[dev] - mu) / sd).numpy()) == y[dev].numpy()).mean()
    assert ours == pytest.approx(expected) and 60 < ours < 100


def test_feature_probe_scores_stsb_by_cosine_of_mean_vectors(tmp_path, capsys):
    import feature_probe
    from scipy.stats import spearmanr
    from checkpoint import make_tokenizer, read_vocab
    import random
    rng, words = random.Random(0), "the cat dog sat ran on a mat good bad film great awful red".split()
    text = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))   # noqa: E731
    for name, header, row in (("SST-2", "sentence\tlabel", lambda i: f"{text()}\t{i % 2}"),
                              ("STS-B", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1"
                               "\tsentence2\tscore", lambda i: f"{i}\tn\tf\t2012\t{i}\ts\ts\t{text()}\t{text()}"
                               f"\t{rng.uniform(0, 5):.2f}")):
        (tmp_path / name).mkdir()
        for split, n in (("train", 40), ("dev", 24)):
            (tmp_path / name / f"{split}.tsv").write_text("\n".join([header] + [row(i) for i in range(n)]) + "\n")
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.preset("tiny", num_layers=2))
    save_checkpoint(tmp_path / "m.pt", model, step=7, epoch=2.0, metrics={"pretrain_perf": -6.0})
    (tmp_path / "probes").mkdir()
    out = tmp_path / "probes" / "features.json"                                  # where tables.py reads it
    assert feature_probe.main(["--ckpt", str(tmp_path / "m.pt"), "--data-dir", str(tmp_path), "--out", str(out)]) == 0
    row, = json.loads(out.read_text())
    assert (row["step"], row["num_layers"], row["pretrain_perf"]) == (7, 2, -6.0)
    tokenizer = make_tokenizer(read_vocab(ROOT / "data" / "bert-base-uncased-vocab.txt"))
    a, b, gold = feature_probe.load_task("stsb", str(tmp_path))["dev"]

    model.eval()

    def vector(text):                                                            # one sentence, unbatched
        e = tokenizer.encode(text)
        return model.bert(torch.tensor([e.ids]), None, torch.tensor([e.type_ids])).hidden[0].mean(0)
    with torch.no_grad():
        cosine = [torch.nn.functional.cosine_similarity(vector(s), vector(t), dim=0).item() for s, t in zip(a, b)]
    assert row["stsb_spearman_cosine"] == pytest.approx(100 * spearmanr(cosine, gold).statistic, abs=1e-3)
    assert 0 <= row["sst2_acc_mean"] <= 100 and 0 <= row["sst2_acc_cls"] <= 100
    assert tables.main(["--results", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert (f"| {row['ckpt']} | 2 | 2 | -6.000 | {row['sst2_acc_mean']:.2f} | {row['sst2_acc_cls']:.2f} | "
            f"{row['stsb_spearman_cosine']:.2f} |") in printed.split("### Frozen-feature probes")[1]
    # a second file (the rerun's models) is read too, after features.json whatever the names' order
    (tmp_path / "probes" / "features-a.json").write_text(json.dumps([{**row, "ckpt": "second.pt", "epoch": 5.0}]))
    assert tables.main(["--results", str(tmp_path)]) == 0
    section = capsys.readouterr().out.split("### Frozen-feature probes")[1]
    assert section.index(f"| {row['ckpt']} | 2 | 2 |") < section.index("| second.pt | 2 | 5 |")


def write_table3_fixture(results: Path) -> None:
    """Three pretrainings with Table 3's rows: again (teacher -5.1), seed2 (teacher -5.3) and seed3 (teacher
    -5.2); a fourth table3/ whose teacher is nobody's. Seed 1 of full fine-tuning at 47 + shift."""
    def write(sub, name, shift, perf):
        write_full_runs(results, str(sub), name, shift, perf)

    def teacher(path, perf):                          # a vanilla curve with epoch 3's end at `perf`
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"valid": True, "step": 3 * e, "epoch": float(e), "pretrain_perf": p}) + "\n"
                                for e, p in ((1, -7.0), (3, perf), (4, perf + 0.2))))

    teacher(results / "pretrain" / "vanilla.jsonl", -5.0)                     # "first": no Table 3
    for curves, t3, perf, (moe, t, tcd, tia) in (
            ("probes/retrain/pretrain", "table3", -5.1, (1.0, 3.0, 4.0, 2.5)),
            ("replicates/seed2/pretrain", "replicates/seed2/table3", -5.3, (2.0, 1.0, 3.0, 2.0)),
            ("replicates/seed3/pretrain", "replicates/seed3/table3", -5.2, (0.0, 2.0, 1.5, None))):
        teacher(results / curves / "vanilla.jsonl", perf)
        teacher(results / t3 / "teacher.jsonl", perf)
        finetunes = results / curves.replace("pretrain", "finetune") if "replicates" in curves else results / "probes/retrain"
        write(finetunes.relative_to(results), "moe_perf", moe, -4.80)
        write(finetunes.relative_to(results), "moe_tcd", tcd, -4.86)
        write(t3, "moe_t", t, -4.83)
        if tia is not None:
            write(t3, "moe_tia", tia, -4.90)
    teacher(results / "replicates" / "seed4" / "table3" / "teacher.jsonl", -5.25)   # nobody's teacher


def test_table3_pairs_each_variant_with_its_own_teachers_pretraining(tmp_path, capsys):
    write_table3_fixture(tmp_path)
    paired, notes = tables.table3_sets(tmp_path)
    assert paired == {"again": tmp_path / "table3", "seed2": tmp_path / "replicates/seed2/table3",
                      "seed3": tmp_path / "replicates/seed3/table3"}
    assert len(notes) == 1 and "replicates/seed4/table3" in notes[0] and "-5.2500" in notes[0]
    assert tables.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out.split("### Table 3: the relation sites one at a time")[1].split("###")[0]
    assert "| again | 48.00 (-4.800) | 50.00 (-4.830) | 51.00 (-4.860) | 49.50 (-4.900) |" in out
    assert "| seed3 | 47.00 (-4.800) | 49.00 (-4.830) | 48.50 (-4.860) | - |" in out
    # + T − MoE: +2, -1, +2: mean +1, s.e. 1, interval ± 4.3027; two of three the paper's way (above 0)
    assert "| T | + T − MoE BERT (perf-aligned) | 3 | +2.00, -1.00, +2.00 | +1.00 ± 1.00 | -3.30 to +5.30 | 2 of 3 | -0.030 |" in out
    # T, I − T: +1, +2, -0.5: mean +0.83
    assert "| I | + T, I (TCD) − + T | 3 | +1.00, +2.00, -0.50 | +0.83 ± 0.73 |" in out
    # T, I, A − T, I: -1.5, -1.0 (seed 3 has no A row): mean -1.25, s.e. 0.25, t(0.975, df 1) = 12.706; both
    # below 0, the paper's way for A
    assert "| A | + T, I, A − + T, I (TCD) | 2 | -1.50, -1.00 | -1.25 ± 0.25 | -4.43 to +1.93 | 2 of 2 | -0.040 |" in out
    assert "| first |" not in out
    # the paper's rows: means 79.51, 80.89, 82.43, 81.96 over its seven columns
    assert "the paper (H=128), the same differences of its Table 3 rows' seven-column means: T +1.38, I +1.54, A -0.47" in out


def test_table3_differences_are_taken_within_each_pretraining_that_has_both_rows(tmp_path):
    write_table3_fixture(tmp_path)
    rows = tables.table3_rows(tmp_path, tables.table3_sets(tmp_path)[0])
    got = {site: (names, diffs, perf) for site, _, _, names, diffs, perf in tables.table3_differences(rows)}
    assert got["T"][:2] == (["again", "seed2", "seed3"], [2.0, -1.0, 2.0])
    assert got["I"][:2] == (["again", "seed2", "seed3"], [1.0, 2.0, -0.5])
    assert got["A"][:2] == (["again", "seed2"], [-1.5, -1.0])                   # seed 3 has no + T, I, A
    assert got["T"][2] == pytest.approx([-0.03] * 3) and got["A"][2] == pytest.approx([-0.04] * 2)


def test_table3_plot_is_drawn_from_two_pretrainings_on(tmp_path):
    pytest.importorskip("matplotlib")
    import plot
    assert plot.plot_table3(tmp_path, tmp_path / "table3.png") is False            # no Table 3 at all
    write_table3_fixture(tmp_path)
    assert plot.plot_table3(tmp_path, tmp_path / "table3.png") is True
    assert (tmp_path / "table3.png").stat().st_size > 1000


def test_table3_stage_alone_pretrains_and_fine_tunes_both_variants(tmp_path):
    """run.sh --table3 retraces the teacher, pretrains MoE + T (λI = 0) and MoE + T, I, A (λA = 1)
    from it and fine-tunes both (full, the five tasks): a stand-in `python` on PATH records each
    command and writes what run.sh copies, so the stage's wiring runs in a second."""
    root, data, bin_dir, log = tmp_path / "repo", tmp_path / "data", tmp_path / "bin", tmp_path / "calls.txt"
    (data / "pretrain").mkdir(parents=True)
    (root / "results").mkdir(parents=True)            # a copy: the stage writes under the repository's results/
    shutil.copy(Path(__file__).resolve().parent.parent / "results" / "run.sh", root / "results")
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
prev=""; for a in "$@"; do
  if [ "$prev" = --out ] || [ "$prev" = --resume ]; then
    case $a in *.pt) touch "${{a%.pt}}.metrics.jsonl" ;; esac
  fi
  prev=$a
done
""")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUNS": str(tmp_path / "runs"),
           "DATA": str(data), "PRETRAIN_SEED": "2"}
    r = subprocess.run(["bash", str(root / "results" / "run.sh"), "--table3"], capture_output=True, text=True,
                       env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "stopped with an error" not in r.stdout + r.stderr and "command not found" not in r.stderr, r.stderr
    calls = log.read_text().splitlines()
    pretrains = [c for c in calls if "pretrain.py" in c]
    assert "/vanilla.pt" in pretrains[0] and len(pretrains) == 3, calls          # the teacher first
    teacher = str(tmp_path / "runs" / "seed2" / "ckpt" / "vanilla.epoch3.pt")
    for name, flag in (("moe_t", "--lambda-i 0"), ("moe_tia", "--lambda-a 1")):
        (run,) = [c for c in pretrains if f"/{name}.pt" in c]
        assert flag in run and f"--teacher {teacher}" in run and "--seed 2" in run and "--stop-epochs 3" in run
        (tune,) = [c for c in calls if "finetune.py" in c and f"{name}.epoch3.pt" in c]
        assert "--task rte mrpc stsb cola sst2" in tune and "--adapter 0 --lr 5e-5" in tune and "--seeds 1" in tune
        assert tune.endswith(f"--out {root}/results/replicates/seed2/table3/{name}.json")


def test_tables_print_each_claim_of_one_pretraining_from_unrounded_averages(tmp_path, capsys):
    import finetune
    (tmp_path / "finetune").mkdir()
    for key, shift in (("teacher", 0.0), ("moe_perf", -0.708), ("moe_tcd", 0.5), ("scratch", -2.0)):
        runs = [{"task": task, "mode": "full", "adapter": 0, "lr": 5e-5, "seed": 1,
                 "best": {"epoch": 1, "train_loss": 0.5, "seconds": 1.0, **{m: 46.434 + shift for m in metrics}}}
                for task, metrics in (("CoLA", ["mcc"]), ("MRPC", ["acc", "f1"]), ("SST-2", ["acc"]),
                                      ("STS-B", ["pearson", "spearman"]), ("RTE", ["acc"]))]
        (tmp_path / "finetune" / f"{key}.json").write_text(json.dumps(
            {"pretrained": {"epoch": 3.0, "pretrain_perf": -5.0}, "runs": runs, "summary": finetune.summarize(runs)}))
    assert tables.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # the rows read 45.73, 46.43 and 46.93, whose rounded differences would be -0.70 and +1.20
    assert "| 45.73 |" in out and "| 46.43 |" in out and "| 46.93 |" in out
    line = next(x for x in out.splitlines() if x.startswith("claims in this pretraining, the better mode"))
    assert "(b) MoE BERT, perf-aligned − Vanilla BERT (teacher) -0.71;" in line
    assert "(c) MoE BERT w/ TCD − MoE BERT, perf-aligned +1.21;" in line          # 0.5 + 0.708
    assert "(c) MoE BERT w/ TCD − Vanilla BERT (teacher) +0.50;" in line
    assert "epoch-aligned" not in line and line.endswith("the teacher over the floor (no pretraining) +2.00")


def _stand_in_python(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text("#!/usr/bin/env bash\n" + body)
    fake.chmod(0o755)


def test_quick_demo_stops_loudly_when_a_stage_fails(tmp_path):
    """A stage that fails (here the MoE baseline's pretraining, started beside the teacher's) puts its own
    error line and its log path on screen, every stage run.sh started is stopped before it exits (the
    teacher's pretraining, still running, too), and run.sh exits non-zero."""
    root, data, pids = tmp_path / "repo", tmp_path / "data", tmp_path / "pids.txt"
    (data / "pretrain").mkdir(parents=True)
    (data / "pretrain" / "train.txt").write_text("text\n")
    (root / "results").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "results" / "run.sh", root / "results")
    _stand_in_python(tmp_path / "bin", f"""
case "$*" in
  *"/moe.pt"*) sleep 1; echo "pretrain.py: error: the token cache is damaged: pass another --cache-dir" >&2; exit 2 ;;
  *"/vanilla.pt"*) sleep 60 & echo $! >> {pids}; wait ;;
esac
""")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "RUNS": str(tmp_path / "runs"),
           "DATA": str(data)}
    r = subprocess.run(["bash", str(root / "results" / "run.sh"), "--quick"], capture_output=True, text=True,
                       env=env, timeout=50, cwd=tmp_path)
    log = tmp_path / "runs" / "quick" / "logs" / "moe.log"
    assert r.returncode != 0
    assert "run.sh: error: pretrain moe failed (exit 2)" in r.stderr, r.stderr
    assert "pretrain.py: error: the token cache is damaged" in r.stderr and f"its log: {log}" in r.stderr
    sleeper = int(pids.read_text().split()[0])
    with pytest.raises(ProcessLookupError):                                # the teacher's stage was stopped
        os.kill(sleeper, 0)
    assert "no stage it started is still running" in r.stderr


def _run_arms_stage(tmp_path: Path, seed: int, tcd_curve: str, ec_align: str, **env_extra: str):
    """run.sh --arms for PRETRAIN_SEED=seed with a stand-in python that logs every call, answers align.py
    (`ec_align`: the shell for the expert-choice arm's performance alignment) and touches the checkpoints it is
    asked for. Returns (completed process, logged calls, the pretraining's arms/ directory)."""
    root, data, log = tmp_path / "repo", tmp_path / "data", tmp_path / "calls.txt"
    (data / "pretrain").mkdir(parents=True)
    pre = root / "results" / "replicates" / f"seed{seed}" / "pretrain"
    pre.mkdir(parents=True)
    (pre / "moe_tcd.jsonl").write_text(tcd_curve)
    shutil.copy(Path(__file__).resolve().parent.parent / "results" / "run.sh", root / "results")
    _stand_in_python(tmp_path / "bin", f"""
echo "$*" >> {log}
case "$*" in
  *align.py*"--target-perf"*moe_ec*) {ec_align} ;;
  *align.py*) echo "$*" | grep -q -- "--by epoch" && echo /ckpt/arm.epoch6.pt || echo /ckpt/arm.epoch5.pt ;;
  -c*) exec {sys.executable} "$@" ;;
esac
prev=""; for a in "$@"; do
  if [ "$prev" = --out ]; then case $a in *.pt) touch "$a" "${{a%.pt}}.metrics.jsonl" ;; esac; fi
  prev=$a
done
""")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "RUNS": str(tmp_path / "runs"),
           "DATA": str(data), "PRETRAIN_SEED": str(seed), **env_extra}
    r = subprocess.run(["bash", str(root / "results" / "run.sh"), "--arms"], capture_output=True, text=True,
                       env=env, timeout=120, cwd=tmp_path)
    return r, log.read_text().splitlines(), pre.parent / "arms"


def test_arms_stage_pretrains_aligns_and_fine_tunes_both_remedies(tmp_path):
    """run.sh --arms (stand-in python): an expert-choice MoE (no λB) and a top-1 MoE + MoDE (λB, α, 256
    tokens) pretrained with the baseline's recipe, epochs and seed; each aligned to the pretraining's TCD
    student by its committed curve and by epoch 6, and fine-tuned as the replicates are."""
    once = tmp_path / "ec-once"                       # the expert-choice arm first reaches TCD at its 7th epoch
    r, calls, arms = _run_arms_stage(
        tmp_path, 3, '{"valid": true, "step": 1, "pretrain_perf": -5.5}\n{"loss": 4.0}\n'
                     '{"valid": true, "step": 2, "pretrain_perf": -4.8512}\n',
        f'if [ -f {once} ]; then echo /ckpt/arm.epoch5.pt; else touch {once}; echo "no candidate" >&2; exit 2; fi',
        MODE_ALPHA="0.3")
    assert r.returncode == 0, r.stderr
    pretrains = [c for c in calls if "pretrain.py" in c]
    assert len(pretrains) == 3, calls
    ec, more = [c for c in pretrains if "/moe_ec.pt" in c]
    root = tmp_path / "repo"
    assert more.startswith(f"{root}/pretrain.py --resume") and more.endswith("--stop-epochs 7")   # one epoch more
    (mode,) = [c for c in pretrains if "/moe_mode.pt" in c]
    for run in (ec, mode):
        assert "--experts 16" in run and "--seed 3" in run and "--stop-epochs 6" in run and "--keep-epochs" in run
        assert "--teacher" not in run
    assert "--routing expert_choice" in ec and "--lambda-b" not in ec and "--mode-alpha" not in ec
    assert "--lambda-b 250" in mode and "--mode-alpha 0.3 --mode-tokens 256" in mode and "--routing" not in mode
    aligns = [c for c in calls if "align.py" in c]
    assert sum("--target-perf -4.8512" in c for c in aligns) == 3 and sum("--by epoch --epoch 6" in c for c in aligns) == 2
    tunes = [c for c in calls if "finetune.py" in c]
    for name, ckpt in (("moe_ec_perf", "epoch5"), ("moe_ec_epoch", "epoch6"), ("moe_mode_perf", "epoch5"),
                       ("moe_mode_epoch", "epoch6")):
        (tune,) = [c for c in tunes if c.endswith(f"--out {arms}/finetune/{name}.json")]
        assert f"/ckpt/arm.{ckpt}.pt" in tune and "--adapter 0 --lr 5e-5" in tune and "--seeds 1" in tune
        assert "--task rte mrpc stsb cola sst2" in tune
    assert (arms / "pretrain" / "moe_ec.jsonl").is_file() and (arms / "pretrain" / "moe_mode.jsonl").is_file()


def test_arms_stage_keeps_an_arm_that_never_reaches_tcd_without_its_perf_row(tmp_path):
    """An arm still short of its TCD student at the vanilla run's 9 epochs: no perf-aligned fine-tuning, a
    "reached": false record, and the epoch-aligned row, the curve and the other arm all go on (no stop)."""
    r, calls, arms = _run_arms_stage(tmp_path, 5, '{"valid": true, "step": 2, "pretrain_perf": -4.8936}\n',
                                     'echo "align.py: error: no candidate is at least as good" >&2; exit 2')
    assert r.returncode == 0, r.stderr
    ec = [c for c in calls if "pretrain.py" in c and "/moe_ec.pt" in c]
    assert [re.search(r"--stop-epochs (\d+)", c)[1] for c in ec] == ["6", "7", "8", "9"], ec   # to vanilla's 9, no further
    assert json.loads((arms / "align-moe_ec-perf.json").read_text()) == {
        "by": "perf", "reached": False, "target": -4.8936, "epochs": 9}
    tunes = [c.split("--out ")[-1] for c in calls if "finetune.py" in c]
    assert sorted(tunes) == sorted(f"{arms}/finetune/{n}.json" for n in ("moe_ec_epoch", "moe_mode_perf", "moe_mode_epoch"))
    assert (arms / "pretrain" / "moe_ec.jsonl").is_file()
    assert "moe_ec did not reach TCD's Pre-Train Perf. (-4.8936) by epoch 9" in r.stdout


def _replicate_json(path: Path, average: float) -> None:
    """A finetune.py results file whose REPLICATE_SETTING five-task average is `average` (every metric equal)."""
    import finetune
    runs = [{"task": task, "mode": "full", "adapter": 0, "lr": 5e-5, "seed": 1,
             "best": {"epoch": 1, **{m: average for m in metrics}}}
            for task, metrics in (("CoLA", ["mcc"]), ("MRPC", ["acc", "f1"]), ("SST-2", ["acc"]),
                                  ("STS-B", ["pearson", "spearman"]), ("RTE", ["acc"]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs, "summary": finetune.summarize(runs)}))


def _curve(path: Path, perfs: dict[int, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"valid": True, "step": 10 * e, "epoch": float(e), "tokens": e,
                                        "pretrain_perf": p}) + "\n" for e, p in perfs.items()))


def test_arms_table_compares_each_remedy_within_its_pretraining(tmp_path, capsys):
    """Expert choice and MoDE against the top-1 MoE at equal Pre-Train Perf., TCD against each, each against the
    teacher, and the premise against vanilla at equal epochs: differences within a pretraining (the arms of seed 0
    pair with "again"), mean ± s.e., t-interval, k of n, a verdict only where the interval leaves 0 out."""
    again, seed2 = tmp_path / "probes" / "retrain", tmp_path / "replicates" / "seed2"
    base = {"again": {"teacher": 46.0, "moe_perf": 45.5, "moe_epoch": 45.0, "moe_tcd": 46.8},
            "seed2": {"teacher": 45.2, "moe_perf": 45.9, "moe_epoch": 45.1, "moe_tcd": 46.0}}
    arms = {"again": {"moe_ec_perf": 45.9, "moe_ec_epoch": 45.4, "moe_mode_perf": 45.1, "moe_mode_epoch": 44.7},
            "seed2": {"moe_ec_perf": 46.6, "moe_ec_epoch": 46.3, "moe_mode_perf": 45.6, "moe_mode_epoch": 45.2}}
    for name, root, tuned, arm_dir in (("again", again, again, tmp_path / "arms"),     # probes/retrain/*.json
                                       ("seed2", seed2, seed2 / "finetune", seed2 / "arms")):
        for key, avg in base[name].items():
            _replicate_json(tuned / f"{key}.json", avg)
        for key, avg in arms[name].items():
            _replicate_json(arm_dir / "finetune" / f"{key}.json", avg)
        _curve(root / "pretrain" / "vanilla.jsonl", {5: -5.0, 6: -4.90, 7: -4.80, 9: -4.6})
        _curve(root / "pretrain" / "moe.jsonl", {5: -4.95, 6: -4.88})            # claim (a)'s epoch: 6
        _curve(root / "pretrain" / "moe_tcd.jsonl", {3: -4.85})                # the curve the arms align to
        _curve(arm_dir / "pretrain" / "moe_ec.jsonl", {5: -4.9, 6: -4.85} if name == "again"
               else {5: -4.9, 6: -4.80, 7: -4.60})                             # seed2 went on to reach TCD
        _curve(arm_dir / "pretrain" / "moe_mode.jsonl", {5: -4.95, 6: -4.93 if name == "again" else -4.95})
    out = tables.arms_table(tmp_path)
    # expert choice − MoE, perf-aligned: +0.4 (again), +0.7 (seed2): mean +0.55, s.e. 0.15, t(1) = 12.706
    assert ("| remedy: expert choice, perf-aligned − MoE BERT, perf-aligned | 2 (again, seed2) | +0.40, +0.70 | "
            "+0.55 ± 0.15 | -1.36 to +2.46 | 2 of 2 | not shown |") in out, out
    assert "| remedy: MoE + MoDE, perf-aligned − MoE BERT, perf-aligned | 2 (again, seed2) | -0.40, -0.30 |" in out
    assert "| teacher adds: MoE BERT w/ TCD − expert choice, perf-aligned | 2 (again, seed2) | +0.90, -0.60 |" in out
    assert "| vs teacher: MoE + MoDE, perf-aligned − Vanilla BERT (teacher) | 2 (again, seed2) | -0.90, +0.40 |" in out
    # the premise at epoch 6, claim (a)'s (not seed2's epoch 7, +0.200): +0.050 and +0.100 nats; MoDE -0.030, -0.050
    assert "| premise: expert-choice MoE − vanilla, Pre-Train Perf. at equal epochs | 2 (again, seed2) | +0.050, +0.100 |" in out
    assert ("| premise: MoE + MoDE (our reading) − vanilla, Pre-Train Perf. at equal epochs | 2 (again, seed2) | "
            "-0.030, -0.050 | -0.040 ± 0.010 | -0.167 to +0.087 | 0 of 2 | not shown |") in out
    assert tables.verdict([-0.03, -0.031]) == "below 0" and tables.verdict([0.5, 0.6, 0.55]) == "above 0"
    assert set(tables.arms_sets(tmp_path)) == {"again", "seed2"}
    (again / "pretrain" / "moe_tcd.jsonl").unlink()                       # a fresh run: results/arms is the first's
    assert set(tables.arms_sets(tmp_path)) == {"first", "seed2"}
    (again / "pretrain" / "moe_tcd.jsonl").write_text("")
    assert tables.verdict([0.4]) == "one pretraining: no verdict"
    assert tables.main(["--results", str(tmp_path)]) == 0
    assert "## The other remedies: expert choice and MoDE beside TCD" in capsys.readouterr().out
    assert "never reached" not in out
    _replicate_json(tmp_path / "replicates" / "seed3" / "arms" / "finetune" / "moe_ec_epoch.json", 40.0)
    (tmp_path / "replicates" / "seed3" / "arms" / "align-moe_ec-perf.json").write_text(
        json.dumps({"by": "perf", "reached": False, "target": -4.89, "epochs": 9}))   # no Tables 1-2 rows: no pairs
    assert tables.arms_table(tmp_path).endswith("no perf-aligned rows there: expert-choice MoE in seed3 (epoch 9)")
    # one replicate's own tables (tables.py --results replicates/seed2) name its one pretraining seed2, not "first"
    assert set(tables.arms_sets(seed2)) == {"seed2"} and tables.pretrainings(seed2)[0].name == "seed2"
    assert "| remedy: MoE + MoDE, perf-aligned − MoE BERT, perf-aligned | 1 (seed2) | -0.30 |" in tables.arms_table(seed2)
    assert [p.name for p in tables.pretrainings(tmp_path)][:2] == ["first", "again"]


def test_routing_picture_reads_each_arms_per_layer_statistics(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import plot
    arms = tmp_path / "arms" / "pretrain"
    arms.mkdir(parents=True)
    (arms / "moe_mode.jsonl").write_text("".join(json.dumps({"step": s, "tokens": s * 1e6, "mlm": 5.0,
                                                             "layer_load_max": [1.5 + s, 2.0, 1.2, 1.1]}) + "\n" for s in (1, 2)))
    (arms / "moe_ec.jsonl").write_text(json.dumps({"step": 1, "tokens": 1e6, "layer_unchosen": [0.3, 0.4],
                                                   "layer_experts_per_token": [1.4, 1.6]}) + "\n"
                                       + json.dumps({"valid": True, "step": 1, "tokens": 1e6, "pretrain_perf": -6}) + "\n")
    assert plot.routing_series(arms / "moe_mode.jsonl", "layer_load_max") == ([1.0, 2.0], [[2.5, 2.0, 1.2, 1.1],
                                                                                          [3.5, 2.0, 1.2, 1.1]])
    assert plot.routing_series(arms / "moe_ec.jsonl", "layer_unchosen") == ([1.0], [[0.3, 0.4]])   # valid rows skipped
    assert plot.plot_routing(tmp_path / "arms", tmp_path / "routing.png") is True
    assert (tmp_path / "routing.png").stat().st_size > 1000
    # with the top-1 baseline's curve beside them (a missing one leaves its panel empty, not the figure)
    assert plot.plot_routing(tmp_path / "arms", tmp_path / "r4.png", arms / "moe_mode.jsonl") is True
    assert plot.plot_routing(tmp_path / "arms", tmp_path / "r5.png", tmp_path / "missing.jsonl") is True
    assert plot.plot_routing(tmp_path / "none", tmp_path / "none.png") is False
