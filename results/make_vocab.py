"""Train a BERT-style uncased WordPiece vocabulary on the pretraining text (a recipe lever).

BERT's 30,522-token vocabulary was built for 3.3 B words; on a 4 M-token corpus most of its rows
are seen a handful of times, and at H=128 its embedding (tied to the MLM output) is ~80% of the
tiny model's parameters. A vocabulary fitted to the corpus is smaller and every row is trained
often. Probed in results/README.md (section 5): it transferred worse, so the reproduction keeps
BERT's. The `tokenizers` trainer breaks ties between equally frequent merges in hash order, so
two runs can differ in a few rare tokens: the vocabulary a run used is saved in its checkpoint.

    python results/make_vocab.py --data ../shared/data/pretrain/train.txt --size 8192 --out runs/vocab8k.txt
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import BERT_SPECIAL_TOKENS, read_vocab  # noqa: E402


def train_vocab(files: list[str], size: int) -> list[str]:
    """The vocabulary as a list (line = id): [PAD] [UNK] [CLS] [SEP] [MASK] first, so [PAD] is 0,
    then the rest sorted (the trainer's own ids are not reproducible)."""
    from tokenizers import BertWordPieceTokenizer
    tokenizer = BertWordPieceTokenizer(lowercase=True, strip_accents=True, clean_text=True)
    tokenizer.train(files, vocab_size=size, min_frequency=2, special_tokens=list(BERT_SPECIAL_TOKENS),
                    limit_alphabet=1000, wordpieces_prefix="##", show_progress=False)
    rest = sorted(set(tokenizer.get_vocab()) - set(BERT_SPECIAL_TOKENS))
    return list(BERT_SPECIAL_TOKENS) + rest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="pretraining text files")
    p.add_argument("--size", type=int, default=8192, help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, help="vocab.txt to write (refused if it exists)")
    args = p.parse_args(argv)
    out = Path(args.out)
    missing = [f for f in args.data if not Path(f).is_file()]
    if missing:
        print(f"make_vocab.py: no such file {missing[0]}: pass the pretraining text", file=sys.stderr)
        return 2
    if out.exists():
        print(f"make_vocab.py: {out} exists: remove it or choose another --out", file=sys.stderr)
        return 2
    if args.size < 256:
        print(f"make_vocab.py: --size {args.size} is too small for a WordPiece vocabulary (use 256 or more)",
              file=sys.stderr)
        return 2
    vocab = train_vocab(args.data, args.size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    Path(f.name).replace(out)
    read_vocab(out)                                                 # the special tokens are there
    print(f"wrote {out}: {len(vocab):,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
