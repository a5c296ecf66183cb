"""results/: alignment picks the right checkpoint, the tables and plots read what the scripts write."""
import json
import sys
from pathlib import Path

import pytest

from model import BertConfig, BertForMaskedLM, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "results"))
import align  # noqa: E402
import tables  # noqa: E402


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    d = tmp_path_factory.mktemp("kept")
    model = BertForMaskedLM(BertConfig.preset("tiny", num_layers=1))
    for epoch, perf in ((1, -6.9), (2, -6.4), (3, -6.1)):
        save_checkpoint(d / f"moe.epoch{epoch}.pt", model, step=10 * epoch, epoch=float(epoch),
                        metrics={"pretrain_perf": perf})
    save_checkpoint(d / "tcd.pt", model, step=10, epoch=1.0, metrics={"pretrain_perf": -6.35})
    return d


def test_alignment_by_performance_and_by_epoch(kept, tmp_path, capsys):
    candidates = [str(kept / f"moe.epoch{e}.pt") for e in (1, 2, 3)]
    assert align.main(["--target", str(kept / "tcd.pt"), "--candidates", *candidates,
                       "--out", str(tmp_path / "a.json")]) == 0
    assert capsys.readouterr().out.strip() == candidates[1]                 # -6.4 is closest to -6.35
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["chosen"]["epoch"] == 2.0 and len(saved["candidates"]) == 3
    assert align.main(["--by", "epoch", "--epoch", "3", "--candidates", *candidates]) == 0
    assert capsys.readouterr().out.strip() == candidates[2]
    with pytest.raises(SystemExit, match="not a pretrain.py checkpoint"):
        align.main(["--by", "epoch", "--epoch", "1", "--candidates", str(tmp_path / "a.json")])


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
    assert "61.50 ± 0.50 (a)" in row and "-5.500" in row                    # adapter won RTE
    assert "| MoE BERT w/ TCD | full | 3 | -5.500 |" in out


def test_plots_are_drawn_from_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    import plot
    (tmp_path / "pretrain").mkdir()
    rows = [{"valid": True, "step": s, "tokens": s * 8192, "pretrain_perf": -7 + s / 1000} for s in (250, 500)]
    (tmp_path / "pretrain" / "vanilla.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot.main(["--results", str(tmp_path)]) == 0
    assert (tmp_path / "pretrain.png").stat().st_size > 1000
