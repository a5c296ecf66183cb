"""finetune.py: GLUE loaders for all eight formats, metrics, full and adapter training, bad input."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import checkpoint
import finetune
from checkpoint import read_vocab, save_checkpoint
from model import BertConfig, BertForMaskedLM

ROOT = Path(__file__).resolve().parent.parent
SHARED_GLUE = ROOT.parent / "shared" / "data" / "glue"
WORDS = "the a cat dog sat ran on under mat house red blue big small good bad film movie great awful".split()


def sentence(rng, n=6):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_task(root: Path, key: str, n_train=48, n_dev=16, seed=0):
    """Files in each task's own glue_data/ layout; labels follow a learnable rule."""
    rng = random.Random(seed)
    task = finetune.TASKS[key]
    d = root / task.name
    d.mkdir(parents=True, exist_ok=True)

    def rows(n):
        out = []
        for i in range(n):
            good = rng.random() < 0.5
            a, b = ("great " if good else "awful ") + sentence(rng), sentence(rng)
            label = (task.labels[0] if good else task.labels[-1]) if task.labels else f"{4.5 if good else 0.5:.3f}"
            out.append({"cola": ["src", label, "", a], "sst2": [a, label],
                        "mrpc": [label, str(i), str(i + 1), a, b], "stsb": [str(i), "news", "f", "2012", str(i), "s", "s", a, b, label],
                        "qqp": [str(i), str(2 * i), str(2 * i + 1), a, b, label],
                        "mnli": [str(i), "p", "q", "fiction", "(a)", "(b)", "(A)", "(B)", a, b, label, label],
                        "qnli": [str(i), a, b, label], "rte": [str(i), a, b, label]}[key])
        return out

    headers = {"cola": None, "sst2": ["sentence", "label"], "mrpc": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
               "stsb": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
               "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
               "mnli": ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                        "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
               "qnli": ["index", "question", "sentence", "label"], "rte": ["index", "sentence1", "sentence2", "label"]}
    for split, n in [("train", n_train)] + [(dev, n_dev) for dev in task.dev]:
        lines = ([headers[key]] if headers[key] else []) + rows(n)
        (d / f"{split}.tsv").write_text("".join("\t".join(r) + "\n" for r in lines))
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.preset("tiny", num_layers=2, num_experts=4))
    save_checkpoint(path, model, vocab=read_vocab(ROOT / "data" / "bert-base-uncased-vocab.txt"))
    return path


@pytest.mark.equations
def test_metrics_against_hand_computed():
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]        # tp=2 tn=2 fp=1 fn=1
    assert finetune.matthews(pred, gold) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert finetune.f1(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert finetune.matthews([1] * 6, gold) == 0.0            # all one class: MCC 0, no crash
    assert finetune.f1([0] * 6, gold) == 0.0
    assert finetune.f1([0, 0], [0, 0]) == 0.0
    s = finetune.score(finetune.TASKS["mrpc"], pred, gold)
    assert s == pytest.approx({"acc": 100 * 4 / 6, "f1": 100 * 2 / 3})
    x, y = [0.1, 0.5, 0.2, 0.9], [1.0, 2.0, 3.0, 4.0]
    sts = finetune.score(finetune.TASKS["stsb"], x, y)
    assert sts["pearson"] == pytest.approx(100 * np.corrcoef(x, y)[0, 1])
    assert sts["spearman"] == pytest.approx(100 * stats.spearmanr(x, y)[0]) and sts["spearman"] == pytest.approx(80.0)
    assert finetune.score(finetune.TASKS["stsb"], [1.0] * 4, y) == {"pearson": 0.0, "spearman": 0.0}
    unit = [0.0, 2.0, 0.0, 2.0]                                  # std exactly 1: an ordinary correlation
    assert finetune.score(finetune.TASKS["stsb"], x, unit)["pearson"] == pytest.approx(100 * np.corrcoef(x, unit)[0, 1])



def spearman_by_ranks(x, y):
    """Spearman's rho as Pearson's r of average ranks, written out (ties share their mean rank)."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(1, len(v) + 1)
        for value in np.unique(v):
            r[v == value] = r[v == value].mean()
        return r
    return np.corrcoef(ranks(x), ranks(y))[0, 1]


@pytest.mark.equations
@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_scikit_learn_on_random_asymmetric_predictions(seed):
    """Random predictions with unequal false positives and false negatives (and unequal class sizes),
    so an F1 or MCC that swaps or double-counts an error term gives another number."""
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    gold = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(int)
    flip = rng.random(n) < np.where(gold == 1, rng.uniform(0.05, 0.5), rng.uniform(0.05, 0.5))
    pred = np.where(flip, 1 - gold, gold)
    if np.sum((pred == 1) & (gold == 0)) == np.sum((pred == 0) & (gold == 1)):
        pred[np.flatnonzero(gold == 0)[0]] = 1               # one more false positive than false negatives
    mrpc = finetune.score(finetune.TASKS["mrpc"], pred.tolist(), gold.tolist())
    assert mrpc["acc"] == pytest.approx(100 * metrics.accuracy_score(gold, pred))
    assert mrpc["f1"] == pytest.approx(100 * metrics.f1_score(gold, pred, zero_division=0))
    cola = finetune.score(finetune.TASKS["cola"], pred.tolist(), gold.tolist())
    assert cola["mcc"] == pytest.approx(100 * metrics.matthews_corrcoef(gold, pred))
    x, y = rng.normal(size=n), rng.normal(size=n) + rng.uniform(-1, 1) * np.arange(n) / n
    x = np.round(x, 1)                                       # ties, which Spearman must average
    sts = finetune.score(finetune.TASKS["stsb"], x.tolist(), y.tolist())
    assert sts["pearson"] == pytest.approx(100 * np.corrcoef(x, y)[0, 1])
    assert sts["spearman"] == pytest.approx(100 * spearman_by_ranks(x, y))


@pytest.mark.parametrize("pred, gold", [
    ([1, 1, 1, 1], [1, 0, 1, 0]),        # one predicted class
    ([0, 0, 0, 0], [1, 0, 1, 0]),        # no positive prediction: F1 0
    ([0, 1, 0, 1], [0, 0, 0, 0]),        # no positive gold
    ([1, 1, 1], [1, 1, 1]),              # all right, one class
    ([1, 0, 1, 1, 0], [0, 1, 0, 0, 1]),  # all wrong: MCC -1
    ([1, 1, 1, 0, 0], [1, 0, 0, 0, 0]),  # fp 2, fn 0
    ([1, 0, 0, 0, 0], [1, 1, 1, 0, 0]),  # fp 0, fn 2
])
@pytest.mark.equations
def test_metrics_match_scikit_learn_in_degenerate_cases(pred, gold):
    metrics = pytest.importorskip("sklearn.metrics")
    assert finetune.matthews(pred, gold) == pytest.approx(metrics.matthews_corrcoef(gold, pred))
    assert finetune.f1(pred, gold) == pytest.approx(metrics.f1_score(gold, pred, zero_division=0))
    acc = finetune.score(finetune.TASKS["sst2"], pred, gold)["acc"]
    assert acc == pytest.approx(100 * metrics.accuracy_score(gold, pred))


@pytest.mark.equations
def test_mnli_scores_matched_and_mismatched_dev_sets_separately(ckpt):
    """Two dev sets of different sizes and predictions: acc_m is the matched one's accuracy,
    acc_mm the mismatched one's, and the task's score is their mean."""
    from checkpoint import load_checkpoint
    mlm, _ = load_checkpoint(ckpt)
    torch.manual_seed(3)
    model = finetune.BertForSequenceClassification(mlm.config, num_labels=3).eval()
    rng = random.Random(5)

    def encoded(n):
        ids = [[101] + [rng.randrange(1000, 3000) for _ in range(rng.randrange(3, 9))] + [102] for _ in range(n)]
        return [(i, [0] * len(i)) for i in ids]
    dev, dev_mm = encoded(40), encoded(23)
    p_m = finetune.predict(model, dev, 8, torch.device("cpu"), False)
    p_mm = finetune.predict(model, dev_mm, 8, torch.device("cpu"), False)
    gold_m, gold_mm = [rng.randrange(3) for _ in dev], [rng.randrange(3) for _ in dev_mm]
    gold_m[:10] = p_m[:10]                                   # different accuracies on the two sets
    data = {"dev": (dev, gold_m), "dev_mm": (dev_mm, gold_mm)}
    result = finetune.evaluate(finetune.TASKS["mnli"], model, data, 8, torch.device("cpu"), False)
    acc_m, acc_mm = 100 * np.mean(np.equal(p_m, gold_m)), 100 * np.mean(np.equal(p_mm, gold_mm))
    assert acc_m != pytest.approx(acc_mm)
    assert result == pytest.approx({"acc_m": acc_m, "acc_mm": acc_mm})
    assert finetune.main_score(result, finetune.TASKS["mnli"]) == pytest.approx((acc_m + acc_mm) / 2)
    mrpc = {"acc": 70.0, "f1": 80.0}
    assert finetune.main_score(mrpc, finetune.TASKS["mrpc"]) == pytest.approx(75.0)

@pytest.mark.parametrize("key", list(finetune.TASKS))
def test_every_task_format_loads(tmp_path, key):
    write_task(tmp_path, key)
    data = finetune.load_task(key, str(tmp_path))
    task = finetune.TASKS[key]
    assert len(data["train"][0]) == 48 and len(data["dev"][0]) == 16
    assert ("dev_mm" in data) == (key == "mnli")
    assert (data["train"][1][0] is None) == (key in ("cola", "sst2"))
    assert set(data["train"][2]) <= (set(range(len(task.labels))) if task.labels else {0.5, 4.5})
    assert finetune.task_key(task.name) == key and finetune.task_key(key.upper()) == key
    direct = finetune.load_task(key, str(tmp_path / task.name))        # the task's own folder works too
    assert direct["train"] == data["train"]


def test_hub_path_through_a_local_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    local = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"premise": ["a b", "c d"], "hypothesis": ["x", "y"], "label": [0, 2]}),
        "validation_matched": datasets.Dataset.from_dict({"premise": ["e"], "hypothesis": ["f"], "label": [1]}),
        "validation_mismatched": datasets.Dataset.from_dict({"premise": ["g"], "hypothesis": ["h"], "label": [2]})})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or local)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    data = finetune.load_task("mnli", None)
    assert calls == [("nyu-mll/glue", "mnli")]
    assert data["train"] == (["a b", "c d"], ["x", "y"], [0, 2])
    assert data["dev"][2] == [1] and data["dev_mm"][2] == [2]


@pytest.mark.parametrize("adapter", [0, 8])
def test_training_improves_loss_and_adapters_train_only_their_set(tmp_path, ckpt, adapter, monkeypatch):
    write_task(tmp_path, "rte", n_train=64)
    seen = {}
    real = finetune.run_one

    def spy(args, key, data, mlm, setting, on_epoch=None):
        before = {n: p.clone() for n, p in mlm.bert.state_dict().items()}
        out = real(args, key, data, mlm, setting, on_epoch)
        seen["unchanged"] = all(torch.equal(before[n], p) for n, p in mlm.bert.state_dict().items())
        return out

    monkeypatch.setattr(finetune, "run_one", spy)
    out = tmp_path / "r.json"
    assert finetune.main(["--task", "rte", "--ckpt", str(ckpt), "--data-dir", str(tmp_path), "--adapter", str(adapter),
                          "--lr", "1e-2" if adapter else "5e-4", "--seeds", "1", "--epochs", "6",
                          "--batch-size", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    config = BertConfig.from_dict(torch.load(ckpt, weights_only=True)["config"])
    assert [result["pretrained"][k] for k in ("vocab_size", "num_layers", "hidden_size")] == \
        [config.vocab_size, config.num_layers, config.hidden_size]
    epochs = result["runs"][0]["epochs"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] - 0.05, epochs
    assert result["runs"][0]["mode"] == ("adapter" if adapter else "full")
    assert result["summary"]["RTE"]["best"]["mean"]["acc"] == result["runs"][0]["best"]["acc"]
    assert seen["unchanged"]                         # the pretrained model itself is never modified


def test_adapter_mode_updates_only_adapters_layernorms_and_head(ckpt):
    import finetune as ft
    from checkpoint import load_checkpoint
    from model import BertForSequenceClassification
    mlm, _ = load_checkpoint(ckpt)
    clf = BertForSequenceClassification(mlm.config, 2, adapter_size=8)
    clf.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
    before = {n: p.clone() for n, p in clf.named_parameters()}
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(1000, 2000, (4, 9))
    for _ in range(3):
        clf(ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step(), opt.zero_grad()
    changed = {n for n, p in clf.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("adapter" in n or ".ln" in n or n.startswith(("pooler", "classifier")) for n in changed)
    assert any("adapter" in n for n in changed) and not any("router" in n or "qkv" in n for n in changed)
    assert ft.TASKS["rte"].labels == ("entailment", "not_entailment")


@pytest.mark.equations
def test_summary_means_over_seeds_then_best_lr_and_paper_row():
    def run(task, lr, seed, acc, mode="full"):
        return {"task": task, "mode": mode, "adapter": 0 if mode == "full" else 64, "lr": lr, "seed": seed,
                "best": {"epoch": 1, "train_loss": 0.1, "seconds": 1.0, "acc": acc}}
    runs = [run("RTE", 1e-5, 1, 60.0), run("RTE", 1e-5, 2, 70.0), run("RTE", 2e-5, 1, 66.0), run("RTE", 2e-5, 2, 66.0),
            run("RTE", 1e-4, 1, 64.0, "adapter")]
    summary = finetune.summarize(runs)["RTE"]
    assert summary["best"]["lr"] == 2e-5 and summary["best"]["mean"]["acc"] == 66.0
    first = next(s for s in summary["settings"] if s["lr"] == 1e-5)
    assert first["mean"] == {"acc": 65.0} and first["std"] == {"acc": 5.0} and first["seeds"] == 2  # metrics only
    assert (first["mode"], first["adapter"]) == ("full", 0)
    adapter = next(s for s in summary["settings"] if s["lr"] == 1e-4)
    assert (adapter["mode"], adapter["adapter"], adapter["seeds"], adapter["mean"]) == ("adapter", 64, 1, {"acc": 64.0})
    heads, cells = finetune.paper_row(finetune.summarize(runs))
    assert len(heads) == 13 and heads[6] == "RTE acc" and cells[6] == "66.00" and cells[-1] == "66.00"
    assert cells[0] == "-"


def cli(*args, cwd):
    import os
    env = {k: v for k, v in os.environ.items() if k != "GLUE_DIR"} | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)                  # never the network in tests


def test_bad_input_is_one_clear_line(tmp_path, ckpt):
    d = write_task(tmp_path / "ok", "rte")
    (tmp_path / "cols" / "RTE").mkdir(parents=True)
    (tmp_path / "cols" / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\n")
    (tmp_path / "label" / "RTE").mkdir(parents=True)
    (tmp_path / "label" / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    (tmp_path / "nodev" / "RTE").mkdir(parents=True)
    (tmp_path / "nodev" / "RTE" / "train.tsv").write_text((d / "train.tsv").read_text())
    (tmp_path / "junk.pt").write_text("junk")
    (tmp_path / "notbert").mkdir()
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    small_vocab = tmp_path / "small-vocab"                # an HF directory with no vocab.txt beside it
    checkpoint.to_hf_bert(BertForMaskedLM(BertConfig.preset("tiny", num_layers=1, vocab_size=1000)), small_vocab)
    nan = write_task(tmp_path / "nan", "stsb")
    (nan / "train.tsv").write_text((nan / "train.tsv").read_text().replace("4.500\n", "nan\n", 1))
    (tmp_path / "latin1" / "RTE").mkdir(parents=True)
    (tmp_path / "latin1" / "RTE" / "train.tsv").write_bytes("index\tsentence1\tsentence2\tlabel\n0\tcaf\xe9\tb\tentailment\n".encode("latin1"))
    noVocab = tmp_path / "novocab.pt"
    save_checkpoint(noVocab, BertForMaskedLM(BertConfig.preset("tiny", num_layers=1)))
    base = ["--ckpt", str(ckpt), "--seeds", "1", "--epochs", "1"]
    cases = [(["--task", "wnli", "--data-dir", str(tmp_path / "ok")], "unknown task 'wnli'"),
             (["--task", "rte", "--data-dir", str(tmp_path / "nodev")], "dev.tsv not found"),
             (["--task", "rte", "--data-dir", str(tmp_path / "cols")], "line 2: 3 columns, expected 4"),
             (["--task", "rte", "--data-dir", str(tmp_path / "label")], "label 'maybe' is not one of"),
             (["--task", "rte", "--data-dir", str(tmp_path / "ok"), "--ckpt", str(tmp_path / "none.pt")], "not found"),
             (["--task", "rte", "--data-dir", str(tmp_path / "ok"), "--ckpt", str(tmp_path / "junk.pt")],
              "not a readable checkpoint"),
             (["--task", "rte", "--data-dir", str(tmp_path / "ok"), "--ckpt", str(tmp_path / "notbert")],
              "is a directory but not a Hugging Face BERT directory: expected config.json"),
             (["--task", "rte", "--data-dir", str(tmp_path / "ok"), "--ckpt", str(noVocab), "--vocab",
               str(tmp_path / "vocab.txt")], "is not a BERT WordPiece vocabulary: it has no [PAD]"),
             (["--task", "rte", "--data-dir", str(tmp_path / "ok"), "--ckpt", str(small_vocab)],
              "has a vocabulary of 1,000 tokens but the default vocab.txt has 30,522"),
             (["--task", "stsb", "--data-dir", str(tmp_path / "nan")], "score 'nan' is not a finite number"),
             (["--task", "rte", "--data-dir", str(tmp_path / "latin1")], "is not UTF-8 text"),
             (["--task", "rte"], "pass --data-dir")]
    ok = ["--task", "rte", "--data-dir", str(tmp_path / "ok")]
    (tmp_path / "other.json").write_text('{"runs": [], "args": {"epochs": 7}}')
    (tmp_path / "shape.json").write_text('{"runs": [1, 2], "args": {}}')
    good_run = {"task": "RTE", "mode": "full", "adapter": 0, "lr": 5e-5, "seed": 1, "best": {"epoch": 1, "acc": 50.0}}
    inner = [{"task": 5}, {"adapter": "x"}, {"lr": "fast"}, {"best": [1, 2]}, {"best": {"acc": 50.0}},
             {"best": {"epoch": 1, "acc": "high"}}, {"seed": 1.5}, {"mode": "half"}, {"task": "NOPE"}]
    for i, bad in enumerate(inner):             # the right keys, the wrong things inside them
        (tmp_path / f"inner{i}.json").write_text(json.dumps({"runs": [{**good_run, **bad}], "args": {}}))
    cases += [(ok + flags, words) for flags, words in [
        (["--adapter", "-5"], "--adapter -5: sizes must be 0 (full) or positive"),
        (["--max-len", "0"], "--max-len 0 must be positive"),
        (["--max-len", "3"], "--max-len 3 leaves no room for a sentence pair"),
        (["--out", str(tmp_path)], "is a directory: pass a file path"),
        (["--out", str(tmp_path / "shape.json")], "is not a finetune.py result"),
        (["--save", str(tmp_path / "junk.pt")], "cannot keep models in"),
        (["--max-len", "100000"], "more than the model's 512 positions"),
        (["--batch-size", "0"], "--batch-size 0 must be positive"),
        (["--epochs", "0"], "--epochs 0 must be positive"),
        (["--lr", "0"], "learning rates must be positive"),
        (["--lr", "inf"], "argument --lr: inf is not a finite number"),
        (["--lr", "1e-4", "nan"], "argument --lr: nan is not a finite number"),
        (["--warmup", "nan"], "argument --warmup: nan is not a finite number"),
        (["--weight-decay=-inf"], "argument --weight-decay: -inf is not a finite number"),
        (["--dropout", "1"], "--dropout 1.0 must be a probability in [0, 1)"),
        (["--dropout", "x"], "argument --dropout: invalid number 'x'"),
        (["--warmup", "1.5"], "--warmup 1.5 must be a share"),
        (["--max-train", "-1"], "--max-train -1 must be 0 or more"),
        (["--out", "/proc/nope/r.json"], "cannot write results"),
        (["--out", str(tmp_path / "other.json")], "holds runs with other settings"),
        (["--out", str(tmp_path / "junk.pt")], "is not a finetune.py result")]]
    cases += [(ok + ["--out", str(tmp_path / f"inner{i}.json")], "is not a finetune.py result") for i in range(len(inner))]
    for extra, words in cases:
        r = cli(*base, *extra, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("finetune.py: error:") and words in r.stderr, r.stderr


def test_results_written_per_run_and_a_rerun_skips_them(tmp_path, ckpt, monkeypatch):
    write_task(tmp_path, "rte", n_train=16, n_dev=8)
    out = tmp_path / "r.json"
    args = ["--task", "rte", "--ckpt", str(ckpt), "--data-dir", str(tmp_path), "--adapter", "0", "8", "--lr", "1e-3",
            "--seeds", "1", "2", "--epochs", "1", "--batch-size", "8", "--out", str(out)]
    real, calls = finetune.run_one, []

    def stop_after_three(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt                                   # Ctrl-C during the fourth run
        calls.append(a[4])
        return real(*a, **k)

    monkeypatch.setattr(finetune, "run_one", stop_after_three)
    assert finetune.main(args) == 130
    kept = json.loads(out.read_text())["runs"]
    assert [(r["adapter"], r["seed"]) for r in kept] == [(0, 1), (0, 2), (8, 1)]
    calls.clear()
    monkeypatch.setattr(finetune, "run_one", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    assert finetune.main(args) == 0
    assert calls == [(8, 1e-3, 2)]                                     # only the missing run
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 4 and result["runs"][:3] == kept


def test_runs_from_another_checkpoint_are_not_mixed_into_one_file(tmp_path):
    write_task(tmp_path, "rte", n_train=16, n_dev=8)
    vocab, path, out = read_vocab(ROOT / "data" / "bert-base-uncased-vocab.txt"), tmp_path / "m.pt", tmp_path / "r.json"
    model = BertForMaskedLM(BertConfig.preset("tiny", num_layers=1))

    def finetune_from(step, perf, seed):                    # the same path, a checkpoint that stood at (step, perf)
        save_checkpoint(path, model, vocab=vocab, step=step, metrics={"pretrain_perf": perf})
        return finetune.main(["--task", "rte", "--ckpt", str(path), "--data-dir", str(tmp_path), "--adapter", "0",
                              "--lr", "1e-3", "--seeds", str(seed), "--epochs", "1", "--batch-size", "8", "--out", str(out)])

    assert finetune_from(100, -5.1590, 1) == 0
    assert finetune_from(100, -5.1511, 2) == 0              # retrained by the same command: float noise, kept
    assert [r["pretrain_perf"] for r in json.loads(out.read_text())["runs"]] == [-5.1590, -5.1511]
    before = out.read_bytes()
    assert finetune_from(100, -5.2190, 3) == 2              # another checkpoint's Pre-Train Perf.
    assert finetune_from(150, -5.1590, 3) == 2              # another step
    assert out.read_bytes() == before                       # nothing written
    assert finetune_from(150, -5.2190, 2) == 0              # nothing left to run: another checkpoint is no error,
    assert out.read_bytes() == before                       # and the file keeps the one its runs came from


def test_default_grid_is_the_papers(ckpt):
    from model import BertConfig
    args = finetune.make_parser().parse_args(["--task", "rte"])
    small, base = BertConfig.preset("small"), BertConfig.preset("base")
    runs = finetune.grid(args, "rte", small)
    assert sorted({a for a, _, _ in runs}) == [0, 16, 64, 128] and len(runs) == 4 * 3 * 3
    assert {lr for a, lr, _ in runs if a == 0} == {1e-5, 2e-5, 5e-5}
    assert {lr for a, lr, _ in runs if a} == {1e-4, 2e-4, 3e-4}
    assert sorted({a for a, _, _ in finetune.grid(args, "rte", base)}) == [0, 16, 64, 128, 256]
    assert sorted({a for a, _, _ in finetune.grid(args, "mnli", small)}) == [0, 16, 64, 128, 512]


def test_qqp_rows_with_a_wrong_column_count_are_skipped_and_counted(tmp_path, capsys):
    d = write_task(tmp_path, "qqp", n_train=10)
    (d / "train.tsv").write_text((d / "train.tsv").read_text() + "99\tonly three\tcolumns\n")
    data = finetune.load_task("qqp", str(tmp_path))
    assert len(data["train"][0]) == 10 and "skipped 1 rows" in capsys.readouterr().err
    d = write_task(tmp_path, "rte")
    (d / "train.tsv").write_text((d / "train.tsv").read_text() + "99\tonly three\n")
    with pytest.raises(finetune.UsageError, match="columns, expected 4"):
        finetune.load_task("rte", str(tmp_path))                       # other tasks keep the error


@pytest.mark.skipif(not (SHARED_GLUE / "RTE").is_dir(), reason="../shared/data/glue not present")
def test_real_rte_short_epoch(tmp_path, ckpt):
    data = finetune.load_task("rte", str(SHARED_GLUE))
    assert len(data["train"][0]) == 2490 and len(data["dev"][0]) == 277
    out = tmp_path / "rte.json"
    assert finetune.main(["--task", "RTE", "--ckpt", str(ckpt), "--data-dir", str(SHARED_GLUE), "--max-train", "256",
                          "--seeds", "1", "--epochs", "1", "--adapter", "16", "--lr", "1e-4", "--out", str(out)]) == 0
    best = json.loads(out.read_text())["runs"][0]["best"]
    assert 0 <= best["acc"] <= 100 and best["epoch"] == 1


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/data/glue not present")
@pytest.mark.parametrize("key", ["cola", "sst2", "mrpc", "stsb"])
def test_real_glue_files_parse(key):
    data = finetune.load_task(key, str(SHARED_GLUE))
    expected = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500)}[key]
    assert (len(data["train"][0]), len(data["dev"][0])) == expected


def test_a_hugging_face_directory_fine_tunes_like_its_checkpoint_with_progress_and_dropout(tmp_path, capsys):
    """--ckpt takes an HF BERT directory: the same runs as from the .pt it was written from. The run
    prints a line per epoch, fine-tunes with --dropout whatever the pretraining run used, and the
    JSON records repository-relative paths."""
    from checkpoint import to_hf_bert
    write_task(tmp_path, "rte", n_train=24, n_dev=8)
    torch.manual_seed(0)
    dense = BertForMaskedLM(BertConfig.preset("tiny", num_layers=1, dropout=0.0, attention_dropout=0.0))
    vocab = read_vocab(ROOT / "data" / "bert-base-uncased-vocab.txt")
    save_checkpoint(tmp_path / "dense.pt", dense, vocab=vocab)
    to_hf_bert(dense, tmp_path / "hf", vocab)
    seen = []
    real = finetune.BertForSequenceClassification

    def spy(config, *a, **k):
        seen.append((config.dropout, config.attention_dropout))
        return real(config, *a, **k)

    results = []
    for ckpt in (tmp_path / "dense.pt", tmp_path / "hf"):
        out = tmp_path / f"{ckpt.stem}.json"
        finetune.BertForSequenceClassification = spy
        try:
            assert finetune.main(["--task", "rte", "--ckpt", str(ckpt), "--data-dir", str(tmp_path), "--adapter", "0",
                                  "--lr", "1e-3", "--seeds", "1", "--epochs", "2", "--batch-size", "8",
                                  "--dropout", "0.25", "--out", str(out)]) == 0
        finally:
            finetune.BertForSequenceClassification = real
        results.append(json.loads(out.read_text()))
    assert seen == [(0.25, 0.25), (0.25, 0.25)]
    a, b = (r["runs"][0]["epochs"] for r in results)
    assert [e["acc"] for e in a] == [e["acc"] for e in b]
    assert [e["train_loss"] for e in a] == pytest.approx([e["train_loss"] for e in b], abs=1e-5)
    printed = capsys.readouterr()
    assert "RTE full lr=0.001 seed=1: epoch 2/2, train loss" in printed.out + printed.err
    assert not results[1]["ckpt"].startswith("/") and not results[1]["args"]["data_dir"].startswith("/")
    assert results[1]["args"]["dropout"] == 0.25


def test_save_keeps_the_best_run_and_transformers_loads_it_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from checkpoint import load_classifier
    dense = tmp_path / "dense.pt"
    torch.manual_seed(1)
    save_checkpoint(dense, BertForMaskedLM(BertConfig.preset("tiny", num_layers=2)),
                    vocab=read_vocab(ROOT / "data" / "bert-base-uncased-vocab.txt"))
    write_task(tmp_path, "mrpc", n_train=32, n_dev=16)
    args = ["--task", "mrpc", "mrpc", "--ckpt", str(dense), "--data-dir", str(tmp_path), "--adapter", "0", "--lr",
            "1e-5", "3e-3", "--seeds", "1", "1", "--epochs", "2", "--batch-size", "8", "--out", str(tmp_path / "r.json"),
            "--save", str(tmp_path / "models")]
    assert finetune.main(args) == 0
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert len(runs) == 2                                              # the repeated task and seed ran once
    best = max(runs, key=lambda r: finetune.main_score(r["best"], finetune.TASKS["mrpc"]))
    kept = json.loads((tmp_path / "models" / "MRPC" / "best.json").read_text())
    assert (kept["lr"], kept["epoch"]) == (best["lr"], best["best"]["epoch"])
    model, saved = load_classifier(tmp_path / "models" / "MRPC" / "model.pt")
    tok = finetune.make_tokenizer(read_vocab(ROOT / "data" / "bert-base-uncased-vocab.txt"))
    raw = finetune.load_task("mrpc", str(tmp_path))
    dev = {"dev": (finetune.encode(tok, *raw["dev"][:2], 128), raw["dev"][2])}
    again = finetune.evaluate(finetune.TASKS["mrpc"], model, dev, 8, torch.device("cpu"), False)
    model.eval()                                                       # evaluate leaves it in train mode
    assert again == pytest.approx({k: best["best"][k] for k in again})   # the kept model scores what was recorded
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "models" / "MRPC" / "hf").eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 0], [101, 2307, 3185, 102, 4937, 102, 0]])
    mask, types = (ids != 0).long(), torch.tensor([[0] * 7, [0, 0, 0, 0, 1, 1, 0]])
    with torch.no_grad():
        ours = model(ids, mask, types).logits
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    assert hf.config.id2label == {0: "0", 1: "1"} and saved["task"] == "MRPC"
    assert finetune.main([*args[:9], "--lr", "1e-9", *args[12:]]) == 0      # a worse run keeps the model kept
    assert json.loads((tmp_path / "models" / "MRPC" / "best.json").read_text()) == kept


def test_the_plan_comes_first_and_a_task_named_twice_runs_once(tmp_path, ckpt, capsys):
    """The first screen states the runs, settings, epochs and results file; rte and RTE are one task;
    after the first epoch a time for the whole command."""
    write_task(tmp_path, "rte", n_train=16, n_dev=8)
    out = tmp_path / "r.json"
    assert finetune.main(["--task", "rte", "RTE", "--ckpt", str(ckpt), "--data-dir", str(tmp_path), "--adapter", "0",
                          "--lr", "1e-3", "2e-3", "--seeds", "1", "--epochs", "2", "--batch-size", "8",
                          "--out", str(out)]) == 0
    text = capsys.readouterr()
    lines = (text.out + text.err).splitlines()
    assert lines[0] == f"plan: 2 fine-tuning runs of {ckpt}"
    assert lines[1] == "  RTE: 2 runs: full at lr 0.001, 0.002; seed 1; 2 epochs a run, batch 8"
    assert lines[2].startswith(f"results: {out} (written after every run")
    assert sum("time: the first epoch took" in l and "all 2 runs: about" in l for l in lines) == 1
    assert [r["task"] for r in json.loads(out.read_text())["runs"]] == ["RTE", "RTE"]


def test_a_glue_field_longer_than_the_csv_modules_limit_is_read(tmp_path):
    d = write_task(tmp_path, "rte", n_train=8, n_dev=4)
    rows = (d / "train.tsv").read_text().splitlines()
    long = "word " * 30_000                                            # 150 KB: past the csv module's 128 KB default
    head, first = rows[0], rows[1].split("\t")
    first[1] = long.strip()
    (d / "train.tsv").write_text("\n".join([head, "\t".join(first), *rows[2:]]) + "\n")
    a, b, y = finetune.read_tsv(d / "train.tsv", finetune.TASKS["rte"])
    assert a[0] == long.strip() and len(a) == len(rows) - 1


def test_an_expert_choice_checkpoint_fine_tunes_with_its_routing(tmp_path):
    """finetune.py builds the layer the checkpoint records (expert choice, its capacity), not a top-1 one."""
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig.preset("tiny", num_layers=1, num_experts=4, routing="expert_choice",
                                            capacity_factor=2.0))
    save_checkpoint(tmp_path / "ec.pt", mlm, vocab=checkpoint.read_vocab(ROOT / "data" / "bert-base-uncased-vocab.txt"))
    write_task(tmp_path, "rte", n_train=16, n_dev=8)
    seen = []
    real = finetune.classifier
    finetune.classifier = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
    try:
        assert finetune.main(["--task", "rte", "--ckpt", str(tmp_path / "ec.pt"), "--data-dir", str(tmp_path),
                              "--adapter", "0", "--lr", "1e-3", "--seeds", "1", "--epochs", "1", "--batch-size", "8",
                              "--out", str(tmp_path / "r.json")]) == 0
    finally:
        finetune.classifier = real
    ffn = seen[0].bert.layers[0].ffn
    assert ffn.routing == "expert_choice" and ffn.capacity_factor == 2.0
