"""Fine-tune a pretrained checkpoint on GLUE, fully or with Houlsby adapters (paper Appendix B).

    python finetune.py --task rte --adapter 64                  # adapter fine-tuning of ckpt/moe_tcd.pt
    python finetune.py --task mrpc --ckpt ckpt/vanilla.pt --lr 1e-5 2e-5 5e-5 --seeds 1 2 3
    python finetune.py --tasks all --ckpt ckpt/moe.pt           # the paper's whole protocol and its row
    python finetune.py --tasks all --ckpt ckpt/moe.pt --adapter 0 64 --seeds 1   # a cheaper first sweep
    python finetune.py --task sst2 --ckpt ckpt/vanilla.pt --adapter 0 --save models/   # keep the best model

Data, in order: --data-dir (a task's own train.tsv/dev.tsv, or a glue_data/ directory holding
<Task>/ folders), $GLUE_DIR/<Task>, else Hugging Face `nyu-mll/glue` for users with a network.
Each run trains for --epochs, evaluates on dev after every epoch and keeps its best epoch. The
summary is the paper's (Sec. 3.1, App. B): for each setting (mode, adapter size, lr) the mean over
seeds of the best-epoch scores, then the best setting, which by default is "the better of full and
adapter fine-tuning" over the paper's grids. Results are written after every run; the same
command run again skips the runs already in its --out file.

MoE checkpoints fine-tune with their router (full mode) and without the balance loss (our choice;
the paper does not say whether fine-tuning keeps L_B): Eq. 5 keeps expert load even for
expert-parallel throughput in pretraining, which a single-process task fine-tune does not need.
--lambda-b adds it back. Dropout is --dropout (BERT's 0.1 by default; the paper does not state it),
whatever the pretraining run used.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

from checkpoint import (check_checkpoint_path, load_checkpoint, make_tokenizer, read_vocab, replace_path,
                        save_checkpoint, to_hf_classifier)
from common import (HelpFormatter, InputFileError, finite_float, is_number, portable_args, portable_path, tune_allocator,
                    unwritable, write_json)
from model import BertForSequenceClassification, adamw_warmup_linear

HERE = Path(__file__).resolve().parent


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


@dataclass
class Task:
    name: str                      # the glue_data/ folder name
    hf: str                        # the nyu-mll/glue config
    columns: tuple                 # TSV header names of (text_a, text_b or None, label)
    labels: tuple | None           # label strings in id order; None: regression score
    metrics: tuple
    hf_columns: tuple = ()
    dev: tuple = ("dev",)


TASKS = {
    "cola": Task("CoLA", "cola", (3, None, 1), ("0", "1"), ("mcc",), ("sentence", None)),
    "sst2": Task("SST-2", "sst2", ("sentence", None, "label"), ("0", "1"), ("acc",), ("sentence", None)),
    "mrpc": Task("MRPC", "mrpc", ("#1 String", "#2 String", "Quality"), ("0", "1"), ("acc", "f1"),
                 ("sentence1", "sentence2")),
    "stsb": Task("STS-B", "stsb", ("sentence1", "sentence2", "score"), None, ("pearson", "spearman"),
                 ("sentence1", "sentence2")),
    "qqp": Task("QQP", "qqp", ("question1", "question2", "is_duplicate"), ("0", "1"), ("acc", "f1"),
                ("question1", "question2")),
    "mnli": Task("MNLI", "mnli", ("sentence1", "sentence2", "gold_label"), ("entailment", "neutral", "contradiction"),
                 ("acc",), ("premise", "hypothesis"), ("dev_matched", "dev_mismatched")),
    "qnli": Task("QNLI", "qnli", ("question", "sentence", "label"), ("entailment", "not_entailment"), ("acc",),
                 ("question", "sentence")),
    "rte": Task("RTE", "rte", ("sentence1", "sentence2", "label"), ("entailment", "not_entailment"), ("acc",),
                ("sentence1", "sentence2")),
}
ROW_SKIPPING = ("QQP", "MNLI")   # their real files hold rows with a wrong column count
COLUMNS = [("cola", "mcc"), ("mrpc", "acc"), ("mrpc", "f1"), ("sst2", "acc"), ("stsb", "pearson"),
           ("stsb", "spearman"), ("rte", "acc"), ("mnli", "acc_m"), ("mnli", "acc_mm"), ("qnli", "acc"),
           ("qqp", "acc"), ("qqp", "f1")]                      # the paper's 12 columns, Tables 1-2


def task_key(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise UsageError(f"unknown task {name!r}: choose from {', '.join(TASKS)} (or --tasks all)")
    return key


# ----------------------------------------------------------------------------- data

def read_tsv(path: Path, task: Task) -> tuple[list, list, list]:
    """(texts_a, texts_b, labels) from a GLUE TSV; every row must have the header's column count
    (QQP and MNLI: rows that do not are skipped and counted, as GLUE's processors do)."""
    if not path.is_file():
        raise UsageError(f"{path} not found: pass --data-dir holding the GLUE {task.name} TSV files")
    csv.field_size_limit(2**31 - 1)                   # a long passage is text, not an error (default: 128 KB)
    try:                                              # utf-8-sig: spreadsheets and editors write a BOM
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = [[c.rstrip("\r") for c in r] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text: convert it, e.g. iconv -f latin1 -t utf-8") from None
    header = None if isinstance(task.columns[0], int) else rows.pop(0) if rows else []
    width = len(header) if header is not None else max(task.columns[0], task.columns[2]) + 1
    try:
        cols = [c if c is None or isinstance(c, int) else header.index(c) for c in task.columns]
    except ValueError:
        raise UsageError(f"{path}: header {header} lacks the {task.name} columns {task.columns}") from None
    a, b, y, skipped = [], [], [], 0
    for n, row in enumerate(rows, 2 if header is not None else 1):
        if len(row) != width and task.name in ROW_SKIPPING:
            skipped += 1                              # as GLUE's own processors do for these files
            continue
        if len(row) != width:
            raise UsageError(f"{path} line {n}: {len(row)} columns, expected {width} for {task.name}")
        a.append(row[cols[0]])
        b.append(row[cols[1]] if cols[1] is not None else None)
        y.append(parse_label(row[cols[2]], task, f"{path} line {n}"))
    if skipped:
        print(f"{path}: skipped {skipped} rows with a column count other than {width}", file=sys.stderr)
    if not a:
        raise UsageError(f"{path} holds no examples")
    return a, b, y


def parse_label(value, task: Task, where: str):
    if task.labels is None:
        try:
            score = float(value)
        except ValueError:
            raise UsageError(f"{where}: score {value!r} is not a number") from None
        if not math.isfinite(score):
            raise UsageError(f"{where}: score {value!r} is not a finite number")
        return score
    value = str(value).strip()
    if value not in task.labels:
        raise UsageError(f"{where}: label {value!r} is not one of {', '.join(task.labels)} ({task.name})")
    return task.labels.index(value)


def load_task(key: str, data_dir: str | None) -> dict:
    """{"train": (a, b, y), "dev": ..., ["dev_mm": ...]} from TSVs, or from the HF hub."""
    task = TASKS[key]
    root = None
    if data_dir:
        d = Path(data_dir)
        root = d if (d / "train.tsv").is_file() else d / task.name
        if not root.is_dir():
            raise UsageError(f"--data-dir {d}: no train.tsv there and no {task.name}/ folder in it")
    elif os.environ.get("GLUE_DIR"):
        root = Path(os.environ["GLUE_DIR"]) / task.name
    if root is not None:
        splits = {"train": read_tsv(root / "train.tsv", task)}
        for name, dev in zip(("dev", "dev_mm"), task.dev):
            splits[name] = read_tsv(root / f"{dev}.tsv", task)
        return splits
    try:
        import datasets                               # network path, for users with one
        hub = datasets.load_dataset("nyu-mll/glue", task.hf)
    except ImportError:
        raise UsageError(f"no local {task.name} data: pass --data-dir or set GLUE_DIR (or pip install datasets "
                         "to fetch GLUE from the Hugging Face hub)") from None
    except Exception as e:                            # no network, a hub outage, a proxy: all one answer
        raise UsageError(f"could not fetch {task.name} from the Hugging Face hub ({type(e).__name__}): pass "
                         "--data-dir with the GLUE TSVs, or set GLUE_DIR") from None
    names = {"train": "train", "dev": "validation" if key != "mnli" else "validation_matched",
             "dev_mm": "validation_mismatched"}
    splits = {}
    for name, split in names.items():
        if split not in hub:
            continue
        ds, (ca, cb) = hub[split], task.hf_columns
        y = [v if task.labels is None else task.labels[v] for v in ds["label"]]
        splits[name] = (ds[ca], ds[cb] if cb else [None] * len(ds), [parse_label(v, task, split) for v in y])
    return splits


def encode(tokenizer, a: list, b: list, max_len: int) -> list[tuple[list, list]]:
    tokenizer.enable_truncation(max_len)
    pairs = [x if y is None else (x, y) for x, y in zip(a, b)]
    return [(e.ids, e.type_ids) for e in tokenizer.encode_batch(pairs)]


def batches(encoded, labels, batch_size: int, generator=None):
    """Dynamically padded batches: (ids, attention_mask, token_types, labels)."""
    order = torch.randperm(len(encoded), generator=generator) if generator else torch.arange(len(encoded))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size].tolist()
        T = max(len(encoded[i][0]) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        types = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, :len(encoded[i][0])] = torch.tensor(encoded[i][0])
            types[r, :len(encoded[i][1])] = torch.tensor(encoded[i][1])
        y = torch.tensor([labels[i] for i in idx])
        yield ids, (ids != 0).long(), types, y


# ----------------------------------------------------------------------------- metrics (GLUE's definitions)

def matthews(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp, tn = np.sum((pred == 1) & (gold == 1)), np.sum((pred == 0) & (gold == 0))
    fp, fn = np.sum((pred == 1) & (gold == 0)), np.sum((pred == 0) & (gold == 1))
    denom = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return float(tp * tn - fp * fn) / denom if denom else 0.0


def f1(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = np.sum((pred == 1) & (gold == 1))
    denom = 2 * tp + np.sum((pred == 1) & (gold == 0)) + np.sum((pred == 0) & (gold == 1))
    return float(2 * tp / denom) if denom else 0.0


def correlation(fn, pred, gold) -> float:
    if np.std(pred) == 0 or np.std(gold) == 0:       # undefined for a constant: report no correlation
        return 0.0
    return float(fn(pred, gold)[0])


def score(task: Task, pred, gold) -> dict[str, float]:
    """The task's GLUE metrics, in percent."""
    found = {"mcc": lambda: matthews(pred, gold), "f1": lambda: f1(pred, gold),
             "acc": lambda: float(np.mean(np.asarray(pred) == np.asarray(gold))),
             "pearson": lambda: correlation(stats.pearsonr, pred, gold),
             "spearman": lambda: correlation(stats.spearmanr, pred, gold)}
    return {m: 100 * found[m]() for m in task.metrics}


# ----------------------------------------------------------------------------- training

def predict(model, encoded, batch_size, device, bf16) -> list:
    model.eval()
    out = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for ids, mask, types, _ in batches(encoded, [0] * len(encoded), batch_size * 2):
            logits = model(ids.to(device), mask.to(device), types.to(device)).logits.float()
            out += (logits.squeeze(-1) if model.num_labels == 1 else logits.argmax(-1)).tolist()
    model.train()
    return out


def evaluate(task: Task, model, data: dict, batch_size, device, bf16) -> dict[str, float]:
    result = score(task, predict(model, data["dev"][0], batch_size, device, bf16), data["dev"][1])
    if "dev_mm" in data:                              # MNLI: matched and mismatched
        mm = score(task, predict(model, data["dev_mm"][0], batch_size, device, bf16), data["dev_mm"][1])
        result = {"acc_m": result["acc"], "acc_mm": mm["acc"]}
    return result


class Setting(NamedTuple):
    """One fine-tuning run of a task: adapter size (0: full fine-tuning), learning rate, seed."""
    adapter: int
    lr: float
    seed: int


def classifier(mlm, task: Task, adapter: int, dropout: float) -> BertForSequenceClassification:
    """The pretrained encoder under a fresh task head (and fresh adapters when adapter > 0)."""
    config = dataclasses.replace(mlm.config, dropout=dropout, attention_dropout=dropout)
    model = BertForSequenceClassification(config, num_labels=len(task.labels or [0]), adapter_size=adapter)
    missing, unexpected = model.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
    assert not unexpected and all("adapter" in k for k in missing), (missing, unexpected)
    return model


def train_epoch(args, model, optimizer, scheduler, train: tuple, generator, bar, device) -> float:
    """One pass over the training set; the mean loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for ids, mask, types, y in batches(*train, args.batch_size, generator):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            res = model(ids.to(device), mask.to(device), types.to(device), labels=y.to(device))
            loss = res.loss + args.lambda_b * res.balance_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update()
        if len(losses) % 10 == 1:                   # a loss on screen from the first step on
            bar.set_postfix_str(f"train loss {np.mean(losses[-10:]):.4f}")
    return float(np.mean(losses))


def run_one(args, key: str, data: dict, mlm, setting: Setting, on_epoch=None) -> dict:
    """Fine-tune one setting, scoring dev after every epoch; the best epoch is the run's result.
    on_epoch(seconds, steps): called after each epoch with its time and optimizer steps."""
    task, (adapter, lr, seed), device = TASKS[key], setting, torch.device(args.device)
    torch.manual_seed(seed)
    model = classifier(mlm, task, adapter, args.dropout).to(device).train()
    epochs = run_epochs(args, key, adapter, mlm.config)
    total = epochs * math.ceil(len(data["train"][0]) / args.batch_size)
    optimizer, scheduler = adamw_warmup_linear(model, lr, args.weight_decay, max(1, int(args.warmup * total)), total)
    generator = torch.Generator().manual_seed(seed)
    history, best_state = [], None
    name = f"{task.name} {'adapter ' + str(adapter) if adapter else 'full'} lr={lr:g} seed={seed}"
    bar = tqdm(total=total, desc=name, leave=False, dynamic_ncols=True)   # where a run is: step, time left
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        train_loss = train_epoch(args, model, optimizer, scheduler, data["train"], generator, bar, device)
        dev = evaluate(task, model, data, args.batch_size, device, args.bf16)
        history.append({"epoch": epoch, "train_loss": train_loss, "seconds": time.time() - t0, **dev})
        if args.save and max(history, key=lambda h: main_score(h, task)) is history[-1]:   # --save: the best epoch's
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        shown = " ".join(f"{k}={v:.2f}" for k, v in dev.items())
        bar.set_postfix_str(f"epoch {epoch}/{epochs} dev {shown}")
        tqdm.write(f"  {name}: epoch {epoch}/{epochs}, train loss {train_loss:.4f}, dev {shown} "
                   f"({history[-1]['seconds']:.0f} s)")
        if on_epoch is not None:
            on_epoch(history[-1]["seconds"], total // epochs)
    bar.close()
    best = max(history, key=lambda h: main_score(h, task))
    return {"task": task.name, "ckpt": portable_path(args.ckpt), "mode": "adapter" if adapter else "full", "adapter": adapter,
            "lr": lr, "seed": seed, "epochs": history, "best": best, **({"state": best_state} if args.save else {})}


def keep_best(args, r: dict, state: dict, mlm, vocab: list[str]) -> bool:
    """--save: make this run's best epoch the task's kept model if it beats the one kept so far (from
    this or an earlier invocation): SAVE/<task>/model.pt (load_classifier reads it) and, for full
    fine-tuning of a dense model, SAVE/<task>/hf/ (transformers.BertForSequenceClassification)."""
    task, root = TASKS[task_key(r["task"])], Path(args.save)
    kept = root / task.name / "best.json"
    score = main_score(r["best"], task)
    if kept.is_file() and json.loads(kept.read_text()).get("score", -math.inf) >= score:
        return False
    model = classifier(mlm, task, r["adapter"], args.dropout)
    model.load_state_dict(state)
    tmp = root / f".{task.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_checkpoint(tmp / "model.pt", model, task=task.name, labels=task.labels, num_labels=model.num_labels,
                        adapter_size=r["adapter"], vocab=vocab, dev=r["best"], lr=r["lr"], seed=r["seed"],
                        pretrained=portable_path(args.ckpt))
        if not mlm.config.moe and not r["adapter"]:
            to_hf_classifier(model, tmp / "hf", vocab, task.labels)
        run = {k: r[k] for k in ("task", "mode", "adapter", "lr", "seed")}
        write_json(tmp / "best.json", {"score": score, **run, "epoch": r["best"]["epoch"], "dev": r["best"]})
        replace_path(tmp, root / task.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def main_score(metrics: dict, task: Task) -> float:
    keys = ["acc_m", "acc_mm"] if "acc_m" in metrics else list(task.metrics)
    return float(np.mean([metrics[k] for k in keys]))


def summarize(runs: list[dict]) -> dict:
    """Per task: mean over seeds of each setting's best-epoch metrics, and the best setting."""
    out = {}
    for name in dict.fromkeys(r["task"] for r in runs):
        task = next(t for t in TASKS.values() if t.name == name)
        settings = {}
        for r in (r for r in runs if r["task"] == name):
            settings.setdefault((r["mode"], r["adapter"], r["lr"]), []).append(r["best"])
        table = []
        for (mode, adapter, lr), bests in settings.items():
            keys = [k for k in bests[0] if k not in ("epoch", "train_loss", "seconds")]
            mean = {k: float(np.mean([b[k] for b in bests])) for k in keys}
            spread = {k: float(np.std([b[k] for b in bests])) for k in keys}
            table.append({"mode": mode, "adapter": adapter, "lr": lr, "seeds": len(bests), "mean": mean, "std": spread})
        out[name] = {"settings": table, "best": max(table, key=lambda s: main_score(s["mean"], task))}
    return out


def paper_row(summary: dict) -> tuple[list[str], list[str]]:
    """The 12 columns of Tables 1-2 and their average, for the tasks that were run."""
    heads, cells, values = [], [], []
    for key, metric in COLUMNS:
        name = TASKS[key].name
        heads.append(f"{name} {metric}")
        v = summary.get(name, {}).get("best", {}).get("mean", {}).get(metric)
        cells.append("-" if v is None else f"{v:.2f}")
        values += [] if v is None else [v]
    return heads + ["Avg"], cells + [f"{np.mean(values):.2f}" if values else "-"]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune.py", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a("--task", nargs="+", default=[], help="one or more of " + ", ".join(TASKS))
    a("--tasks", choices=["all"], help="every task whose data is present")
    a("--ckpt", default="ckpt/moe_tcd.pt", help="checkpoint written by pretrain.py")
    a("--data-dir", help="a task's train.tsv/dev.tsv, or a glue_data/ dir of <Task>/ folders "
      "(default: $GLUE_DIR, else the HF hub)")
    a("--adapter", type=int, nargs="+", help="adapter sizes, 0 = full fine-tuning (default: the paper's, "
      "0 16 64 128, plus 256 at H=768 and 512 for MNLI at H=128)")
    a("--lr", type=finite_float, nargs="+", help="learning rates (default: the paper's, full 1e-5 2e-5 5e-5; "
      "adapter 1e-4 2e-4 3e-4)")
    a("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one run per seed; the summary averages them")
    a("--epochs", type=int, help="training epochs (default: the paper's, 10; 20 for MNLI/QNLI/QQP adapters at H=128)")
    a("--batch-size", type=int, default=32, help="examples per step (paper: 32)")
    a("--max-len", type=int, default=128, help="tokens per example, longer ones are truncated")
    a("--max-train", type=int, default=0, help="use only the first N training examples (0: all)")
    a("--warmup", type=finite_float, default=0.06, help="share of steps spent warming up (paper: 0.06)")
    a("--weight-decay", type=finite_float, default=0.01, help="AdamW weight decay (paper: 0.01, with Adam; AdamW is our choice)")
    a("--dropout", type=finite_float, default=0.1, help="hidden and attention dropout while fine-tuning, whatever "
      "the pretraining run used (BERT's default; the paper does not state it)")
    a("--lambda-b", type=finite_float, default=0.0, help="MoE balance loss weight during fine-tuning")
    a("--bf16", action="store_true", help="bfloat16 autocast")
    a("--vocab", help="vocab.txt when the checkpoint carries none")
    a("--out", help="results JSON, written after every run; a re-run skips the runs it holds "
      "(default: runs/finetune-<ckpt>-<tasks>.json)")
    a("--save", help="keep each task's best model (best run, best epoch, by the dev score) in SAVE/<task>/: "
      "model.pt, and hf/ for transformers.BertForSequenceClassification after full fine-tuning of a dense model")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1 ...")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    tune_allocator()
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return run(args)
    except (UsageError, InputFileError, FileNotFoundError) as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("finetune.py: interrupted; every finished run is kept in the --out JSON, and the same command "
              "continues with the rest", file=sys.stderr)
        return 130


def interrupt(signum, frame):
    raise KeyboardInterrupt


def check_args(args) -> None:
    for name in ("batch_size", "max_len", "epochs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {value} must be positive")
    for name in ("max_train", "weight_decay", "lambda_b"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be 0 or more")
    if any(a < 0 for a in args.adapter or []):
        raise UsageError(f"--adapter {' '.join(map(str, args.adapter))}: sizes must be 0 (full) or positive")
    if any(not lr > 0 for lr in args.lr or []):
        raise UsageError(f"--lr {' '.join(map(str, args.lr))}: learning rates must be positive")
    if args.max_len < 5:
        raise UsageError(f"--max-len {args.max_len} leaves no room for a sentence pair ([CLS] a [SEP] b [SEP]): "
                         "pass 5 or more (paper: 128)")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout {args.dropout} must be a probability in [0, 1)")
    if not 0 <= args.warmup < 1:
        raise UsageError(f"--warmup {args.warmup} must be a share of the steps in [0, 1)")
    if args.save and (unwritable(Path(args.save)) or Path(args.save).is_file()):
        raise UsageError(f"cannot keep models in {args.save} ({unwritable(Path(args.save)) or 'a file'}): pass a directory")
    for name in ("task", "adapter", "lr", "seeds"):   # a value given twice is one run, not two reported as two
        if getattr(args, name):
            setattr(args, name, list(dict.fromkeys(getattr(args, name))))


def grid(args, key: str, cfg) -> list[Setting]:
    """Every run of one task: the paper's grid unless narrowed."""
    adapters = args.adapter
    if adapters is None:
        adapters = [0, 16, 64, 128] + ([256] if cfg.hidden_size >= 768 else []) + \
                   ([512] if key == "mnli" and cfg.hidden_size <= 128 else [])
    return [Setting(adapter, lr, seed) for adapter in adapters
            for lr in (args.lr or ([1e-4, 2e-4, 3e-4] if adapter else [1e-5, 2e-5, 5e-5])) for seed in args.seeds]


def run_epochs(args, key: str, adapter: int, cfg) -> int:
    """--epochs, else the paper's: 10, and 20 for adapters on MNLI, QNLI and QQP at H=128 (App. B)."""
    return args.epochs or (20 if adapter and key in ("mnli", "qnli", "qqp") and cfg.hidden_size <= 128 else 10)


SAME_RESULTS = ("ckpt", "epochs", "dropout", "batch_size", "max_len", "max_train", "warmup", "weight_decay", "lambda_b", "bf16")


def earlier_runs(out: Path, args) -> tuple[list[dict], dict]:
    """The runs an earlier invocation left in `out`, if it ran with the same settings, and where the
    checkpoint they came from stood."""
    if not out.is_file():
        return [], {}
    try:
        old = json.loads(out.read_text())
        runs, old_args = old["runs"], old["args"]
        well_formed = isinstance(old_args, dict) and isinstance(runs, list) and all(map(_well_formed_run, runs))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        well_formed = False
    if not well_formed:
        raise UsageError(f"{out} exists and is not a finetune.py result: pass another --out")
    differ = [k for k in SAME_RESULTS if old_args.get(k) != recorded_args(args).get(k)]
    if differ:
        raise UsageError(f"{out} holds runs with other settings ({', '.join('--' + k.replace('_', '-') for k in differ)}): "
                         "pass another --out")
    return runs, old.get("pretrained") or {}


def _well_formed_run(r) -> bool:
    """A run as run_one records it: the keys, and values of the right kinds inside them."""
    return (isinstance(r, dict) and {"task", "adapter", "lr", "seed", "best", "mode"} <= r.keys()
            and r["task"] in {t.name for t in TASKS.values()} and r["mode"] in ("full", "adapter")
            and isinstance(r["adapter"], int) and isinstance(r["seed"], int) and is_number(r["lr"])
            and isinstance(r["best"], dict) and "epoch" in r["best"]
            and all(is_number(v) for v in r["best"].values()))


def done_settings(runs: list[dict], key: str) -> set[Setting]:
    """The settings already run on task `key`."""
    return {Setting(r["adapter"], r["lr"], r["seed"]) for r in runs if r["task"] == TASKS[key].name}


# a checkpoint retrained by the same command differs by float noise (CPU reductions are not bitwise
# repeatable): Pre-Train Perf. by up to ~0.01 on one machine, up to 0.06 on another (results/README.md,
# section 5); two kept epochs of one run differ by 0.05 or more, so 0.02 admits only the first kind
SAME_PERF = 0.02


def check_same_checkpoint(out: Path, old: dict, pretrained: dict) -> None:
    """Refuse to add runs to `out` from a checkpoint other than the one its runs (`old`) came from."""
    was, now = old.get("pretrain_perf"), pretrained["pretrain_perf"]
    same_perf = was is None or now is None or abs(was - now) <= SAME_PERF
    if old.get("step") != pretrained["step"] or not same_perf:
        raise UsageError(f"{out} holds runs fine-tuned from another checkpoint (step {old.get('step')}, Pre-Train "
                         f"Perf. {was}; this one: step {pretrained['step']}, {now}): pass another --out")


def recorded_args(args) -> dict:
    return portable_args(args, "ckpt", "data_dir", "vocab", "out")


def write_results(out: Path, args, runs: list[dict], pretrained: dict) -> dict:
    summary = summarize(runs) if runs else {}
    heads, cells = paper_row(summary)
    write_json(out, {"ckpt": portable_path(args.ckpt), "pretrained": pretrained, "args": recorded_args(args), "runs": runs,
                     "summary": summary, "paper_row": dict(zip(heads, cells))})
    return summary


def where_it_stood(mlm, ckpt: dict, vocab: list[str]) -> dict:
    """What every result records of its checkpoint: step, epoch, shape and Pre-Train Perf."""
    return {"step": ckpt.get("step"), "epoch": ckpt.get("epoch"), "vocab_size": len(vocab),
            "num_layers": mlm.config.num_layers, "hidden_size": mlm.config.hidden_size,
            "pretrain_perf": (ckpt.get("metrics") or {}).get("pretrain_perf")}


def describe_plan(args, todo: dict, cfg, out: Path) -> list[str]:
    """What this command will do, before it does it: runs, settings, epochs, where the results go."""
    n = sum(len(s) for s in todo.values())
    lines = [f"plan: {n} fine-tuning run{'s' * (n != 1)} of {args.ckpt}"]
    for key, settings in todo.items():
        if not settings:
            lines.append(f"  {TASKS[key].name}: already done in {out}")
            continue
        full = sorted({s.lr for s in settings if not s.adapter})
        adapters = sorted({s.adapter for s in settings if s.adapter})
        adapter_lrs = sorted({s.lr for s in settings if s.adapter})
        parts = ([f"full at lr {', '.join(f'{lr:g}' for lr in full)}"] if full else []) + (
            [f"adapter{'s' * (len(adapters) > 1)} {', '.join(map(str, adapters))} at lr "
             f"{', '.join(f'{lr:g}' for lr in adapter_lrs)}"]
            if adapters else [])
        epochs = sorted({run_epochs(args, key, s.adapter, cfg) for s in settings})
        seeds = sorted({s.seed for s in settings})
        lines.append(f"  {TASKS[key].name}: {len(settings)} run{'s' * (len(settings) != 1)}: {' and '.join(parts)}; "
                     f"seed{'s' * (len(seeds) != 1)} {', '.join(map(str, seeds))}; "
                     f"{'/'.join(map(str, epochs))} epoch{'s' * (epochs != [1])} a run, batch {args.batch_size}")
    lines.append(f"results: {out} (written after every run; the same command skips finished runs)")
    lines.append("time: estimated after the first epoch. Fewer runs: narrow the grid, e.g. --adapter 0 64 "
                 "--seeds 1 --epochs 3 (the defaults are the paper's: 36 runs of 10 epochs a task)")
    return lines


# GLUE's training-set sizes, for the time estimate where the TSVs are not at hand (the hub path)
GLUE_TRAIN = {"cola": 8551, "sst2": 67349, "mrpc": 3668, "stsb": 5749, "qqp": 363846, "mnli": 392702,
              "qnli": 104743, "rte": 2490}


def train_size(key: str, args) -> int:
    """Training examples of a task as this command will use them (--max-train included), cheaply."""
    root = args.data_dir or os.environ.get("GLUE_DIR")
    path = None
    if root:
        d = Path(root)
        path = d / "train.tsv" if (d / "train.tsv").is_file() else d / TASKS[key].name / "train.tsv"
    try:
        with open(path, "rb") as f:
            n = sum(1 for _ in f) - 1
    except (OSError, TypeError):
        n = GLUE_TRAIN[key]
    return min(n, args.max_train) if args.max_train else n


class Timer:
    """After the first epoch: a rough time for every remaining epoch of this command, from that epoch's
    seconds per optimizer step (other tasks scale with their training sets: a rough guide)."""

    def __init__(self, todo: dict, args, cfg, train_sizes: dict):
        self.todo, self.args, self.cfg, self.sizes, self.done = todo, args, cfg, train_sizes, False

    def __call__(self, seconds: float, steps: int) -> None:
        if self.done:
            return
        self.done = True
        per_step = seconds / max(steps, 1)
        total = sum(run_epochs(self.args, key, s.adapter, self.cfg) * math.ceil(self.sizes(key) / self.args.batch_size)
                    for key, settings in self.todo.items() for s in settings)
        left = per_step * total
        n = sum(map(len, self.todo.values()))
        tqdm.write(f"time: the first epoch took {seconds:.0f} s; all {n} run{'s' * (n != 1)}: about "
                   + (f"{left / 3600:.1f} h" if left >= 3600 else f"{max(1, round(left / 60))} min") + " on this machine")


def fine_tune_task(args, key: str, settings: list[Setting], mlm, vocab: list[str], out: Path, runs: list,
                   pretrained: dict, timer=None) -> None:
    """Every setting of one task; the results file is written after each run."""
    raw, tokenizer = load_task(key, args.data_dir), make_tokenizer(vocab)
    if args.max_train:
        raw["train"] = tuple(col[:args.max_train] for col in raw["train"])
    data = {split: (encode(tokenizer, a, b, args.max_len), y) for split, (a, b, y) in raw.items()}
    for setting in tqdm(settings, desc=TASKS[key].name, dynamic_ncols=True):
        r = run_one(args, key, data, mlm, setting, on_epoch=timer)
        state = r.pop("state", None)
        if state is not None and keep_best(args, r, state, mlm, vocab):
            tqdm.write(f"kept as the best {r['task']} model so far: {Path(args.save) / r['task']}")
        r["pretrain_perf"] = pretrained["pretrain_perf"]  # per run: a retrained checkpoint's runs stay visible
        runs.append(r)
        write_results(out, args, runs, pretrained)
        tqdm.write(f"{r['task']:6s} {r['mode']:7s} adapter={r['adapter']:<4d} lr={r['lr']:.0e} seed={r['seed']}: best epoch "
                   f"{r['best']['epoch']} " + " ".join(f"{k}={v:.2f}" for k, v in r["best"].items()
                                                        if k not in ("epoch", "train_loss", "seconds")))


def run(args) -> int:
    check_args(args)
    if args.tasks == "all":
        root = args.data_dir or os.environ.get("GLUE_DIR")
        keys = [k for k in TASKS if root is None or (Path(root) / TASKS[k].name).is_dir()]
    else:
        keys = list(dict.fromkeys(task_key(t) for t in args.task))     # rte and RTE are one task
    if not keys:
        raise UsageError("no task: pass --task NAME or --tasks all")
    out = Path(args.out or f"runs/finetune-{Path(args.ckpt).stem}-{'-'.join(keys)}.json")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory: pass a file path such as {out / 'results.json'}")
    reason = unwritable(out.parent)
    if reason:
        raise UsageError(f"cannot write results to {out.parent} ({reason}): pass another --out")
    check_checkpoint_path(args.ckpt)
    runs, earlier = earlier_runs(out, args)
    mlm, ckpt = load_checkpoint(args.ckpt)
    if args.max_len > mlm.config.max_position:
        raise UsageError(f"--max-len {args.max_len} is more than the model's {mlm.config.max_position} positions")
    vocab = ckpt.get("vocab") or read_vocab(args.vocab or HERE / "data" / "bert-base-uncased-vocab.txt")
    if len(vocab) != mlm.config.vocab_size:
        raise UsageError(f"{args.ckpt} has a vocabulary of {mlm.config.vocab_size:,} tokens but "
                         f"{'--vocab' if args.vocab else 'the default vocab.txt'} has {len(vocab):,}: put the model's "
                         "vocab.txt beside its config.json, or pass --vocab")
    pretrained = where_it_stood(mlm, ckpt, vocab)
    todo = {key: [g for g in grid(args, key, mlm.config) if g not in done_settings(runs, key)] for key in keys}
    adding = any(todo.values())      # a finished file is left as it is, whatever checkpoint stands there now
    if runs and adding:
        check_same_checkpoint(out, earlier, pretrained)
    print("\n".join(describe_plan(args, todo, mlm.config, out)), flush=True)
    timer = Timer(todo, args, mlm.config, lambda key: train_size(key, args))
    for key in keys:
        if todo[key]:
            fine_tune_task(args, key, todo[key], mlm, vocab, out, runs, pretrained, timer)
    # nothing left to run: the file stays as written, with the checkpoint its runs came from
    summary = write_results(out, args, runs, pretrained) if adding else summarize(runs) if runs else {}
    for name, result in summary.items():
        best = result["best"]
        print(f"{name}: best setting {best['mode']}" + (f" adapter {best['adapter']}" if best["adapter"] else "")
              + f", lr {best['lr']:g}, over {best['seeds']} seed{'s' * (best['seeds'] != 1)}")
    heads, cells = paper_row(summary)
    print("\n| checkpoint | " + " | ".join(heads) + " |\n|" + "---|" * (len(heads) + 1))
    print(f"| {args.ckpt} | " + " | ".join(cells) + " |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
