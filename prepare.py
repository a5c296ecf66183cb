"""Prepare a pretraining corpus: text -> flat token files that pretrain.py memory-maps.

    python prepare.py --data train.txt more/ --valid valid.txt --out corpus/   # then: pretrain.py --data corpus/
    python prepare.py --data books.jsonl.gz --out corpus/        # a fixed random 1% of the documents held out
    python prepare.py --data hf:wikitext:wikitext-103-raw-v1 --out corpus/

Documents stream from text files (documents separated by a blank line), .jsonl files (a "text" field a
line), either gzip- or zstd-compressed (.gz, .zst), directories of those, or hf:NAME[:CONFIG] (the train
split, read in batches from its Arrow files). They are tokenized in batches by the tokenizers library on
every core and appended as uint16 (uint32 for a vocabulary over 65,535) to train.bin; the held-out
documents go to valid.bin; meta.json says what the files hold and which sources (path, size, mtime)
made them. Everything is written into a temporary directory that is renamed when complete, so an
interrupted prepare never looks finished. Memory is bounded by a batch of documents, not by the corpus.

The token files hold the documents' tokens end to end, nothing between them: pretrain.py cuts that
stream into [CLS] + (seq_len - 2) tokens + [SEP] windows (`Windows`) as it reads them, so one prepared
corpus serves any sequence length. `pretrain.py --data <text>` prepares into its cache on first use and
finds it again from the sources' sizes and mtimes alone (`find_or_prepare`), never reading the text twice.
"""
from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from checkpoint import make_tokenizer, read_vocab
from common import HelpFormatter, InputFileError, alive, finite_float

FORMAT = 1                       # meta.json's format version: a reader refuses any other
HERE = Path(__file__).resolve().parent
BATCH_BYTES = 4 << 20            # text per tokenizer batch: bounds memory, keeps every core busy
TEXT_SUFFIXES = (".txt", ".jsonl")


class PrepareError(InputFileError):
    """A corpus or prepared corpus that cannot be used: one line, exit code 2."""


def seeded(*parts: int):
    """A torch.Generator seeded from a tuple of ints (the same tuple, the same stream, on any machine)."""
    import torch
    return torch.Generator().manual_seed(int(hashlib.sha1(repr(parts).encode()).hexdigest()[:15], 16))


# ----------------------------------------------------------------------------- sources and documents

def source_files(spec: str) -> list[Path]:
    """The files a --data/--valid entry stands for (a directory: its text files, sorted); [] for hf:."""
    if spec.startswith("hf:"):
        return []
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and text_suffix(p) in TEXT_SUFFIXES)
    if not path.is_file():
        raise PrepareError(f"corpus {spec} not found: pass text/.jsonl files (.gz/.zst too), directories, or hf:NAME")
    return [path]


def text_suffix(path: Path) -> str:
    """.txt or .jsonl, looking through a compression suffix."""
    suffixes = path.suffixes
    return suffixes[-2] if len(suffixes) > 1 and suffixes[-1] in (".gz", ".zst") else path.suffix


def open_text(path: Path) -> io.TextIOBase:
    """The file as text: UTF-8 (a BOM dropped), any line ending read as \\n, decompressed if .gz/.zst."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise PrepareError(f"{path}: reading .zst needs the zstandard package: pip install zstandard") from None
        return io.TextIOWrapper(zstandard.open(path, "rb"), encoding="utf-8-sig")
    with path.open("rb") as f:
        if b"\0" in f.read(65536):
            raise PrepareError(f"{path} looks binary (NUL bytes): pass UTF-8 text or .jsonl files")
    return path.open(encoding="utf-8-sig")


def file_documents(path: Path) -> Iterator[str]:
    """A file's documents in order: blank-line separated text, or a .jsonl file's "text" fields."""
    try:
        with open_text(path) as f:
            if text_suffix(path) == ".jsonl":
                yield from jsonl_documents(f, path)
            else:
                yield from text_documents(f)
    except UnicodeDecodeError:
        raise PrepareError(f"{path} is not UTF-8: convert it, e.g. iconv -f latin1 -t utf-8") from None
    except (OSError, EOFError) as e:
        raise PrepareError(f"{path} cannot be read ({e}): is it truncated or not what its name says?") from None


def text_documents(f: io.TextIOBase) -> Iterator[str]:
    """str.split("\\n\\n") over the whole text, read in chunks: a buffer's last part may go on in the next."""
    tail = ""
    while chunk := f.read(1 << 20):
        parts = (tail + chunk).split("\n\n")
        tail = parts.pop()
        yield from (d for d in parts if d.strip())
    if tail.strip():
        yield tail


def jsonl_documents(f: io.TextIOBase, path: Path) -> Iterator[str]:
    for n, line in enumerate(f, 1):
        if line.strip():
            try:
                doc = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                doc = None
            if not isinstance(doc, str):
                raise PrepareError(f"{path} line {n}: not a JSON object with a 'text' string")
            yield doc


def hf_documents(spec: str) -> Iterator[str]:
    """The train split's non-blank "text" values, a batch of rows at a time (never the whole column)."""
    try:
        import datasets
    except ImportError:
        raise PrepareError(f"{spec} needs the datasets package: pip install datasets, or pass local text files") from None
    name, _, config = spec[3:].partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:                        # noqa: BLE001 - offline, a hub outage, a wrong name: one answer
        raise PrepareError(f"could not load {spec} from the Hugging Face hub ({type(e).__name__}): check the name "
                           "and the network, or prepare it where there is one and pass the directory") from None
    for batch in data.iter(batch_size=1000):
        yield from (t for t in batch["text"] if t.strip())


def documents(specs: list[str]) -> Iterator[str]:
    for spec in specs:
        if spec.startswith("hf:"):
            yield from hf_documents(spec)
        else:
            for path in source_files(spec):
                yield from file_documents(path)


def fingerprint(specs: list[str]) -> list[dict]:
    """What identifies the sources without reading them: each file's path, size and mtime; hf: names."""
    out = []
    for spec in specs:
        if spec.startswith("hf:"):
            out.append({"path": spec})
        for path in source_files(spec):
            st = path.stat()
            out.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


# ----------------------------------------------------------------------------- the split

def held_out(n_docs: int, share: float, seed: int) -> set[int]:
    """The indices of the documents held out when no --valid is given: a fixed random `share` (at least
    one), the same ones pretrain.py has always held out for this count and seed."""
    import torch
    if n_docs == 0:
        raise PrepareError("the corpus holds no text: give files with documents in them")
    if n_docs == 1:
        raise PrepareError("the corpus holds one document: add text, or pass held-out text with --valid")
    n_valid = max(1, round(n_docs * share))
    return set(torch.randperm(n_docs, generator=seeded(seed, n_docs))[:n_valid].tolist())


def count_documents(specs: list[str]) -> int:
    return sum(1 for _ in documents(specs))


# ----------------------------------------------------------------------------- tokenize and write

def vocab_hash(vocab: list[str]) -> str:
    return hashlib.sha1("\n".join(vocab).encode()).hexdigest()[:16]


def token_dtype(vocab: list[str]) -> np.dtype:
    return np.dtype(np.uint16 if len(vocab) <= 65536 else np.uint32)


def batches(docs: Iterator[str], budget: int = BATCH_BYTES) -> Iterator[list[str]]:
    """Documents in lists of about `budget` characters (one long document is a batch of its own)."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= budget:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def write_tokens(specs: list[str], valid_specs: list[str] | None, vocab: list[str], tmp: Path, share: float,
                 seed: int, total_bytes: int) -> dict:
    """Tokenize the sources into tmp/train.bin and tmp/valid.bin; returns the counts for meta.json."""
    tok, dtype = make_tokenizer(vocab), token_dtype(vocab)
    held = set() if valid_specs else held_out(count_documents(specs), share, seed)
    counts = {"train_documents": 0, "valid_documents": 0, "train_tokens": 0, "valid_tokens": 0}
    streams = [(specs, held)] + ([(valid_specs, None)] if valid_specs else [])    # held_set None: all held out
    t0, index = time.time(), 0
    with open(tmp / "train.bin", "wb") as train, open(tmp / "valid.bin", "wb") as valid, \
            tqdm(total=total_bytes or None, unit="B", unit_scale=True, dynamic_ncols=True, desc="prepare") as bar:
        for source, held_set in streams:
            for batch in batches(documents(source)):
                ids = {"train": [], "valid": []}
                for enc in tok.encode_batch(batch, add_special_tokens=False):
                    ids["valid" if held_set is None or index in held_set else "train"].append(enc.ids)
                    index += held_set is not None
                for side, f in (("train", train), ("valid", valid)):     # one write a side and batch
                    if ids[side]:
                        flat = np.concatenate([np.asarray(doc, dtype=dtype) for doc in ids[side]])
                        flat.tofile(f)
                        counts[f"{side}_documents"] += len(ids[side])
                        counts[f"{side}_tokens"] += flat.size
                bar.update(sum(len(d) for d in batch))        # characters: bytes for ASCII text
                tokens = counts["train_tokens"] + counts["valid_tokens"]
                bar.set_postfix(tokens=f"{tokens:,}", tok_per_s=f"{tokens / max(time.time() - t0, 1e-9):,.0f}")
    if not counts["train_tokens"] or not counts["valid_tokens"]:
        side = "training" if not counts["train_tokens"] else "held-out"
        raise PrepareError(f"the {side} text holds no tokens: give files with documents in them")
    return counts


def prepare(specs: list[str], valid_specs: list[str] | None, vocab: list[str], out: Path, share: float = 0.01,
            seed: int = 0, log=print) -> dict:
    """Write the prepared corpus `out` (a new directory) and return its meta.json."""
    files = [p for s in specs + (valid_specs or []) for p in source_files(s)]
    total = sum(p.stat().st_size for p in files if p.suffix not in (".gz", ".zst"))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):      # a killed prepare's, never a live one's
        pid = stale.name.rsplit("-", 1)[1]
        if stale == tmp or not (pid.isdigit() and alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        counts = write_tokens(specs, valid_specs, vocab, tmp, share, seed, total)
        meta = {"format": FORMAT, "vocab_size": len(vocab), "vocab_sha1": vocab_hash(vocab),
                "dtype": token_dtype(vocab).name, **counts, "sources": fingerprint(specs),
                "valid": fingerprint(valid_specs) if valid_specs else {"held_out_share": share, "seed": seed}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"prepared {counts['train_documents']:,} + {counts['valid_documents']:,} held-out documents: "
        f"{counts['train_tokens']:,} + {counts['valid_tokens']:,} tokens -> {out}")
    return meta


# ----------------------------------------------------------------------------- read

class Windows:
    """[CLS] + seq_len - 2 tokens + [SEP] windows over a flat token array (a memmap is never copied):
    window i holds tokens i*(seq_len-2) ... (i+1)*(seq_len-2) - 1; the last partial window is dropped."""

    def __init__(self, tokens: np.ndarray, seq_len: int, cls_id: int, sep_id: int):
        self.tokens, self.seq_len, self.cls_id, self.sep_id = tokens, seq_len, cls_id, sep_id
        self.body = seq_len - 2
        self.count = len(tokens) // self.body
        self.fingerprint = None                    # data_fingerprint of its corpus (open_corpus sets it)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, rows) -> np.ndarray:
        """(len(rows), seq_len) int64 for an array of window indices or a slice."""
        rows = np.arange(self.count)[rows] if isinstance(rows, slice) else np.asarray(rows)
        out = np.empty((len(rows), self.seq_len), dtype=np.int64)
        out[:, 0], out[:, -1] = self.cls_id, self.sep_id
        out[:, 1:-1] = self.tokens[rows[:, None] * self.body + np.arange(self.body)]
        return out

    def all(self) -> np.ndarray:
        return self[:]


def read_meta(corpus: Path, vocab: list[str]) -> dict:
    """meta.json of a prepared corpus, checked against its files and the vocabulary (PrepareError if not)."""
    try:
        meta = json.loads((corpus / "meta.json").read_text())
    except (OSError, ValueError):
        raise PrepareError(f"{corpus}/meta.json is missing or not JSON: prepare the corpus again (prepare.py)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PrepareError(f"{corpus} is not a prepared corpus of format {FORMAT}: prepare it again (prepare.py)")
    if meta.get("vocab_sha1") != vocab_hash(vocab):
        raise PrepareError(f"{corpus} was prepared with another vocabulary ({meta.get('vocab_size')} tokens): "
                           "prepare it again with this --vocab")
    for part in ("train", "valid"):
        path, want = corpus / f"{part}.bin", meta.get(f"{part}_tokens", -1) * np.dtype(meta.get("dtype", "uint16")).itemsize
        if not path.is_file() or path.stat().st_size != want:
            raise PrepareError(f"{path} is missing or not the size meta.json gives ({want:,} bytes): "
                               "it is truncated or foreign; prepare the corpus again")
    return meta


def open_corpus(corpus: Path, vocab: list[str], seq_len: int) -> tuple[Windows, Windows]:
    """(train windows, held-out windows) of a prepared corpus, memory-mapped."""
    meta = read_meta(corpus, vocab)
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    out, digests = [], []
    for part in ("train", "valid"):
        tokens = np.memmap(corpus / f"{part}.bin", dtype=meta["dtype"], mode="r")
        digests.append(scan_tokens(tokens, len(vocab), corpus / f"{part}.bin"))
        out.append(Windows(tokens, seq_len, cls_id, sep_id))
    fingerprint = data_fingerprint(meta, digests)
    for part, windows in zip(("train", "valid"), out):
        windows.fingerprint = fingerprint
        if not len(windows):
            raise PrepareError(f"the {'training' if part == 'train' else 'held-out'} text has {len(windows.tokens)} "
                               f"tokens, fewer than one segment of {seq_len}: add text")
    return out[0], out[1]


def scan_tokens(tokens: np.ndarray, vocab_size: int, path: Path, chunk: int = 1 << 24) -> str:
    """Every id inside the vocabulary, before any step uses one; returns the tokens' SHA-1 (one read, in chunks)."""
    digest = hashlib.sha1()
    for start in range(0, len(tokens), chunk):
        part = tokens[start:start + chunk]                         # a contiguous view of the map: no copy
        top = int(part.max(initial=0))
        if top >= vocab_size:
            raise PrepareError(f"{path} holds token id {top:,}, beyond the vocabulary's {vocab_size:,}: it is damaged "
                               "or foreign; prepare the corpus again (prepare.py)")
        digest.update(part)
    return digest.hexdigest()


def data_fingerprint(meta: dict, token_sha1s: list[str]) -> str:
    """What a run trained on: the tokens themselves and their vocabulary, not where the files lie or when
    they were written (a corpus copied to a cluster's scratch disk is the same data; one changed token is not)."""
    content = [meta["vocab_sha1"], meta["dtype"], *token_sha1s]
    return hashlib.sha1(json.dumps(content).encode()).hexdigest()[:16]


def is_prepared(spec: list[str] | None) -> bool:
    return bool(spec) and len(spec) == 1 and (Path(spec[0]) / "meta.json").is_file()


def cache_key(specs: list[str], valid_specs: list[str] | None, vocab: list[str], share: float, seed: int) -> str:
    """The sources' paths, sizes and mtimes, the vocabulary and the split: a changed source is a new key."""
    split = fingerprint(valid_specs) if valid_specs else [share, seed]
    return hashlib.sha1(json.dumps([FORMAT, fingerprint(specs), split, vocab_hash(vocab)]).encode()).hexdigest()[:16]


def find_or_prepare(specs: list[str], valid_specs: list[str] | None, vocab: list[str], cache_dir: Path,
                    share: float, seed: int, log=print) -> Path:
    """The prepared corpus for these sources in cache_dir, prepared first if it is missing or damaged."""
    corpus = cache_dir / f"corpus-{cache_key(specs, valid_specs, vocab, share, seed)}"
    if _ready(corpus, vocab, log):
        return corpus
    cache_dir.mkdir(parents=True, exist_ok=True)
    # one job prepares, the others wait for it (two pretrainings started together share the cache);
    # the kernel drops the lock of a killed job, so a crash never leaves it held
    with open(cache_dir / f".{corpus.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another job is preparing {corpus.name}: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _ready(corpus, vocab, log):                 # the other job made it
            return corpus
        prepare(specs, valid_specs, vocab, corpus, share, seed, log)
    return corpus


def _ready(corpus: Path, vocab: list[str], log) -> bool:
    if not corpus.is_dir():
        return False
    try:
        read_meta(corpus, vocab)
    except PrepareError as e:                          # derived data: rebuild it
        log(f"rebuilding the damaged cache: {e}")
        return False
    log(f"prepared corpus {corpus}")
    return True


# ----------------------------------------------------------------------------- command line

def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="text/.jsonl files (.gz/.zst too), directories, or hf:NAME[:CONFIG]")
    p.add_argument("--valid", nargs="+", help="held-out text (default: a fixed random share of the documents)")
    p.add_argument("--out", required=True, help="the prepared corpus: a new directory")
    p.add_argument("--vocab", default=str(HERE / "data" / "bert-base-uncased-vocab.txt"), help="WordPiece vocab.txt")
    p.add_argument("--valid-share", type=finite_float, default=0.01, help="share of documents held out without --valid")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out documents (pretrain.py uses its --seed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if not 0 < args.valid_share < 1:
            raise PrepareError(f"--valid-share {args.valid_share} must be between 0 and 1")
        if out.exists() and not args.overwrite:
            raise PrepareError(f"{out} exists: pass --overwrite to replace it, or another --out")
        if out.exists() and not (out / "meta.json").is_file():
            raise PrepareError(f"{out} is not a prepared corpus (no meta.json): --overwrite replaces only what "
                               "prepare.py made; pass another --out")
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGXFSZ)}
        signal.signal(signal.SIGTERM, _interrupt)        # a killed job (SIGTERM) cleans up as Ctrl-C does
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # past a file-size limit: an error to report, not a kill
        try:
            prepare(args.data, args.valid, read_vocab(args.vocab), out, args.valid_share, args.seed)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    except (InputFileError, FileNotFoundError) as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                                 # a full disk, a file-size limit, a place not writable
        print(f"prepare.py: error: cannot write {out} ({e.strerror or e}): free disk space or raise the file-size "
              "limit (ulimit -f), or pass another --out; nothing was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prepare.py: interrupted; {out} was not written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
