"""Out-of-distribution masked-LM evaluation on Pile subsets (paper Section 5, Table 4).

    python ood_eval.py --data pile/val.jsonl.zst --ckpt ckpt/vanilla.pt ckpt/moe.pt ckpt/moe_tcd.pt
    python ood_eval.py --data ../shared/data/pile-ood/val.jsonl --ckpt ckpt/*.pt --max-tokens-per-subset 100000

Input: the Pile's format, one {"text": ..., "meta": {"pile_set_name": ...}} per line, plain,
.gz or .zst (needs the `zstandard` package). Each document becomes [CLS] ... [SEP] windows of
--seq-len; 15% of the non-special positions are masked (80% [MASK], 10% random, 10% kept)
from a fixed seed. Masks depend only on the text, the vocab and the seed, never on a model's
weights, so every checkpoint with the same vocab is scored on identical inputs. The score is
the mean log-likelihood of the original token at masked positions, per subset.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import CheckpointError, check_checkpoint_path, load_checkpoint, make_tokenizer
from common import HelpFormatter, InputFileError, is_number, portable_args, portable_path, tune_allocator, unwritable, write_json
import prepare
from model import mask_tokens, masked_log_likelihood

PAPER_SUBSETS = ["ArXiv", "DM Mathematics", "Github", "StackExchange", "Ubuntu IRC"]
PILE_SUBSETS = PAPER_SUBSETS + [
    "Pile-CC", "PubMed Central", "Books3", "OpenWebText2", "FreeLaw", "USPTO Backgrounds", "PubMed Abstracts",
    "Gutenberg (PG-19)", "OpenSubtitles", "Wikipedia (en)", "BookCorpus2", "EuroParl", "HackerNews",
    "YoutubeSubtitles", "PhilPapers", "NIH ExPorter", "Enron Emails"]
SHORT = {"ArXiv": "AX", "DM Mathematics": "DM", "Github": "GH", "StackExchange": "SE", "Ubuntu IRC": "UI"}


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


def open_text(path: Path):
    if not path.is_file():
        raise UsageError(f"{path} not found: pass a Pile-format .jsonl, .jsonl.gz or .jsonl.zst file")
    return prepare.open_text(path)            # UTF-8, .gz/.zst decompressed, binary refused


def read_pile(path: Path, subsets: list[str], max_docs: int) -> dict[str, list[str]]:
    """Documents per subset, in file order; at most max_docs each (0: all)."""
    try:
        return _read_pile(path, subsets, max_docs)
    except (OSError, EOFError, UnicodeDecodeError) as e:   # gzip.BadGzipFile is an OSError
        raise UsageError(f"{path} cannot be read as UTF-8 JSON lines{' (' + path.suffix + ')' if path.suffix in ('.gz', '.zst') else ''}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _read_pile(path: Path, subsets: list[str], max_docs: int) -> dict[str, list[str]]:
    docs = {s: [] for s in subsets}
    seen = 0
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            seen += 1
            try:
                record = json.loads(line)
            except ValueError:
                raise UsageError(f"{path} line {n}: not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UsageError(f"{path} line {n}: record has no 'text' string")
            name = (record.get("meta") or {}).get("pile_set_name")
            if name in docs and (not max_docs or len(docs[name]) < max_docs):
                docs[name].append(record["text"])
    if not seen:
        raise UsageError(f"{path} is empty: expected one JSON record per line")
    return docs


def windows(docs: list[str], tokenizer, vocab: list[str], seq_len: int, max_tokens: int) -> torch.Tensor:
    """Every document cut into [CLS] ... [SEP] windows (the last one padded), (N, seq_len)."""
    cls, sep, body = vocab.index("[CLS]"), vocab.index("[SEP]"), seq_len - 2
    rows, total = [], 0
    for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
        for s in range(0, len(enc.ids), body):
            piece = enc.ids[s:s + body]
            rows.append([cls, *piece, sep] + [0] * (body - len(piece)))
            total += len(piece)
            if max_tokens and total >= max_tokens:
                return torch.tensor(rows)
    return torch.tensor(rows, dtype=torch.long).reshape(-1, seq_len)


def masked_inputs(docs: dict, vocab: list[str], args) -> dict:
    """{subset: (inputs, labels)}: fixed masks from (seed, subset), independent of any model."""
    tokenizer = make_tokenizer(vocab)
    special = torch.tensor([vocab.index(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")])
    out = {}
    for i, (name, texts) in enumerate(docs.items()):
        if not texts:
            continue
        ids = windows(texts, tokenizer, vocab, args.seq_len, args.max_tokens_per_subset)
        generator = torch.Generator().manual_seed(args.seed * 1000 + PILE_SUBSETS.index(name))
        out[name] = mask_tokens(ids, special, vocab.index("[MASK]"), len(vocab), generator)
    return out


def score(model, inputs, labels, batch_size: int, bf16: bool, device) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for s in range(0, len(inputs), batch_size):
            x, y = inputs[s:s + batch_size].to(device), labels[s:s + batch_size].to(device)
            ll, n = masked_log_likelihood(model, x, y, (x != 0).long())
            total, count = total + ll, count + n
    return total, count


LEGEND = ("AX = ArXiv, DM = DM Mathematics, GH = Github, SE = StackExchange, UI = Ubuntu IRC; each cell is the "
          "mean log-likelihood of the original token at masked positions (closer to 0 is better)")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ood_eval.py", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a("--data", required=True, help="Pile-format .jsonl / .jsonl.gz / .jsonl.zst")
    a("--ckpt", nargs="+", default=["ckpt/vanilla.pt", "ckpt/moe.pt", "ckpt/moe_tcd.pt"],
      help="checkpoints to score side by side on identical masks")
    a("--subsets", nargs="+", default=PAPER_SUBSETS, help="Pile subsets (default: the five of Table 4)")
    a("--max-docs-per-subset", type=int, default=0, help="first N documents of each subset (0: all)")
    a("--max-tokens-per-subset", type=int, default=0, help="first N tokens of each subset (0: all)")
    a("--seq-len", type=int, default=128, help="tokens per window, [CLS] and [SEP] included (paper: 128)")
    a("--seed", type=int, default=0, help="seed of the fixed masks")
    a("--batch-size", type=int, default=64, help="windows per forward pass")
    a("--bf16", action="store_true", help="bfloat16 autocast")
    a("--out", default="runs/ood.json", help="results JSON, written after every checkpoint; a re-run skips "
      "the checkpoints it holds")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1 ...")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    tune_allocator()
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return run(args)
    except (UsageError, InputFileError) as e:
        print(f"ood_eval.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ood_eval.py: interrupted; every finished checkpoint is kept in the --out JSON, and the same "
              "command continues with the rest", file=sys.stderr)
        return 130


def interrupt(signum, frame):
    raise KeyboardInterrupt


def check_args(args) -> None:
    for name in ("seq_len", "batch_size"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive")
    for name in ("max_docs_per_subset", "max_tokens_per_subset"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be 0 (all) or more")
    if args.seq_len < 3:
        raise UsageError(f"--seq-len {args.seq_len} leaves no room for text between [CLS] and [SEP]")
    unknown = [s for s in args.subsets if s not in PILE_SUBSETS]
    if unknown:
        raise UsageError(f"unknown subset {unknown[0]!r}: Pile subsets are {', '.join(PILE_SUBSETS)}")


SAME_RESULTS = ("data", "subsets", "max_docs_per_subset", "max_tokens_per_subset", "seq_len", "seed", "bf16")


def earlier_results(out: Path, args) -> dict:
    if not out.is_file():
        return {}
    try:
        old = json.loads(out.read_text())
        results, old_args = old["results"], old["args"]
        if not isinstance(results, dict) or not isinstance(old_args, dict) or not all(
                map(_well_formed_scores, results.values())):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UsageError(f"{out} exists and is not an ood_eval.py result: pass another --out") from None
    differ = [k for k in SAME_RESULTS if old_args.get(k) != recorded_args(args).get(k)]
    if differ:
        raise UsageError(f"{out} holds scores with other settings ({', '.join('--' + k.replace('_', '-') for k in differ)}): "
                         "pass another --out")
    return results


def _well_formed_scores(scores) -> bool:
    """One checkpoint's scores as score_checkpoint records them: {subset: {log_likelihood, masked_tokens, windows}}."""
    return isinstance(scores, dict) and all(
        isinstance(v, dict) and {"log_likelihood", "masked_tokens", "windows"} <= v.keys()
        and (v["log_likelihood"] is None or is_number(v["log_likelihood"]))
        and isinstance(v["masked_tokens"], int) and isinstance(v["windows"], int) for v in scores.values())


def recorded_args(args) -> dict:
    return portable_args(args, "data", "out", "ckpt")


def write_results(out: Path, args, absent: list, results: dict) -> None:
    write_json(out, {"data": portable_path(args.data), "args": recorded_args(args), "absent_subsets": absent, "legend": LEGEND,
                     "results": results})


def score_checkpoint(path: str, docs: dict, prepared: dict, args, device) -> dict:
    model, ckpt = load_checkpoint(path)
    vocab = ckpt.get("vocab")
    if not vocab:
        raise CheckpointError(f"{path} carries no vocab: pass a checkpoint of pretrain.py or a Hugging Face BERT "
                              "directory with its vocab.txt")
    if ckpt.get("mlm_head") is False:
        raise CheckpointError(f"{path} holds a bare encoder without a masked-LM head: ood_eval.py scores masked "
                              "tokens, so pass a BertForMaskedLM")
    if args.seq_len > model.config.max_position:
        raise UsageError(f"--seq-len {args.seq_len} is more than the {model.config.max_position} positions of {path}")
    key = hash(tuple(vocab))                       # same vocab -> the very same masked inputs
    if key not in prepared:
        prepared[key] = masked_inputs(docs, vocab, args)
    model.to(device).eval()
    row = {}
    for name, (inputs, labels) in tqdm(prepared[key].items(), desc=Path(path).name, dynamic_ncols=True):
        t0 = time.time()
        total, count = score(model, inputs, labels, args.batch_size, args.bf16, device)
        row[name] = {"log_likelihood": total / count if count else None, "masked_tokens": count, "windows": len(inputs)}
        ll = "-" if row[name]["log_likelihood"] is None else f"{row[name]['log_likelihood']:.3f}"
        tqdm.write(f"  {Path(path).name} {name}: {ll} over {count:,} masked tokens ({time.time() - t0:.0f} s)")
    return row


def run(args) -> int:
    check_args(args)
    for path in args.ckpt:                          # fail before the slow part
        check_checkpoint_path(path)
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory: pass a file path such as {out / 'ood.json'}")
    reason = unwritable(out.parent)
    if reason:
        raise UsageError(f"cannot write results to {out.parent} ({reason}): pass another --out")
    results = earlier_results(out, args)
    docs = read_pile(Path(args.data), args.subsets, args.max_docs_per_subset)
    absent = [s for s, d in docs.items() if not d]
    if absent:
        print(f"subsets absent from {args.data}: {', '.join(absent)}")
    if len(absent) == len(docs):
        raise UsageError(f"none of the subsets {', '.join(args.subsets)} occurs in {args.data}")
    todo = [p for p in args.ckpt if portable_path(p) not in results]
    present = [s for s in docs if docs[s]]
    print(f"plan: score {len(todo)} of {len(args.ckpt)} checkpoint{'s' * (len(args.ckpt) != 1)} on {len(present)} "
          f"Pile subset{'s' * (len(present) != 1)} ({', '.join(present)}), "
          + (f"up to {args.max_tokens_per_subset:,} tokens each" if args.max_tokens_per_subset else "all their tokens")
          + f", the same masks for every checkpoint; results: {out} (written after every checkpoint; "
          "the same command skips scored ones)", flush=True)
    device, prepared = torch.device(args.device), {}
    for i, path in enumerate(args.ckpt, 1):
        if portable_path(path) in results:
            print(f"[{i}/{len(args.ckpt)}] {path}: already scored in {out}, skipped")
            continue
        print(f"[{i}/{len(args.ckpt)}] scoring {path}")
        results[portable_path(path)] = score_checkpoint(path, docs, prepared, args, device)
        write_results(out, args, absent, results)
    print_table(args, absent, results)
    write_results(out, args, absent, results)
    print(f"wrote {out}")
    return 0


def print_table(args, absent: list, results: dict) -> None:
    names = [s for s in args.subsets if s not in absent]
    cell = lambda r: "-" if r["log_likelihood"] is None else f"{r['log_likelihood']:.3f}"
    print("\n| model | " + " | ".join(SHORT.get(s, s) for s in names) + " |\n|" + "---|" * (len(names) + 1))
    for path in args.ckpt:
        print(f"| {Path(path).stem} | " + " | ".join(cell(results[portable_path(path)][s]) for s in names) + " |")
    first = results[portable_path(args.ckpt[0])]
    print("| masked tokens | " + " | ".join(f"{first[s]['masked_tokens']:,}" for s in names) + " |")
    print("\n" + LEGEND + "; '-': no masked token in that subset")


if __name__ == "__main__":
    sys.exit(main())
