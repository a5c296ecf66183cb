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
import gzip
import io
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from model import CheckpointError, load_checkpoint, make_tokenizer, mask_tokens, masked_log_likelihood, tune_allocator

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
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise UsageError(f"reading {path.name} needs the zstandard package: pip install zstandard") from None
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(path.open("rb")), encoding="utf-8")
    return path.open(encoding="utf-8")


def read_pile(path: Path, subsets: list[str], max_docs: int) -> dict[str, list[str]]:
    """Documents per subset, in file order; at most max_docs each (0: all)."""
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="Pile-format .jsonl / .jsonl.gz / .jsonl.zst")
    p.add_argument("--ckpt", nargs="+", default=["ckpt/vanilla.pt", "ckpt/moe.pt", "ckpt/moe_tcd.pt"])
    p.add_argument("--subsets", nargs="+", default=PAPER_SUBSETS)
    p.add_argument("--max-docs-per-subset", type=int, default=0, help="0: all")
    p.add_argument("--max-tokens-per-subset", type=int, default=0, help="0: all")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default="results/ood.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    tune_allocator()
    try:
        return run(args)
    except (UsageError, CheckpointError) as e:
        print(f"ood_eval.py: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    unknown = [s for s in args.subsets if s not in PILE_SUBSETS]
    if unknown:
        raise UsageError(f"unknown subset {unknown[0]!r}: Pile subsets are {', '.join(PILE_SUBSETS)}")
    for path in args.ckpt:                          # fail before the slow part
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint {path} not found: pass .pt files written by pretrain.py")
    docs = read_pile(Path(args.data), args.subsets, args.max_docs_per_subset)
    absent = [s for s, d in docs.items() if not d]
    if absent:
        print(f"subsets absent from {args.data}: {', '.join(absent)}")
    if len(absent) == len(docs):
        raise UsageError(f"none of the subsets {', '.join(args.subsets)} occurs in {args.data}")
    device, prepared, results = torch.device(args.device), {}, {}
    for path in args.ckpt:
        model, ckpt = load_checkpoint(path)
        vocab = ckpt.get("vocab")
        if not vocab:
            raise CheckpointError(f"{path} carries no vocab: it was not written by pretrain.py")
        key = hash(tuple(vocab))                   # same vocab -> the very same masked inputs
        if key not in prepared:
            prepared[key] = masked_inputs(docs, vocab, args)
        model.to(device).eval()
        row = {}
        for name, (inputs, labels) in tqdm(prepared[key].items(), desc=Path(path).name, dynamic_ncols=True):
            total, count = score(model, inputs, labels, args.batch_size, args.bf16, device)
            row[name] = {"log_likelihood": total / max(count, 1), "masked_tokens": count, "windows": len(inputs)}
        results[path] = row
    names = [s for s in args.subsets if s not in absent]
    print("\n| model | " + " | ".join(SHORT.get(s, s) for s in names) + " |\n|" + "---|" * (len(names) + 1))
    for path, row in results.items():
        print(f"| {Path(path).stem} | " + " | ".join(f"{row[s]['log_likelihood']:.3f}" for s in names) + " |")
    first = next(iter(results.values()))
    print("| masked tokens | " + " | ".join(f"{first[s]['masked_tokens']:,}" for s in names) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"data": args.data, "args": vars(args), "absent_subsets": absent, "results": results},
                              indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
