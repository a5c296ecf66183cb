"""prepare.py: streamed documents, the held-out split, the token files and their windows against the
in-memory pipeline pretrain.py used before (kept here verbatim as the reference), the cache, bad input."""
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare
import pretrain
from checkpoint import make_tokenizer, read_vocab

ROOT = Path(__file__).resolve().parent.parent
VOCAB = read_vocab(ROOT / "data" / "bert-base-uncased-vocab.txt")
SHARED = ROOT.parent / "shared" / "data" / "pretrain"


# ----------------------------------------------------------------------------- the reference: pretrain.py before prepare.py

def old_seeded(*parts):
    return torch.Generator().manual_seed(int(hashlib.sha1(repr(parts).encode()).hexdigest()[:15], 16))


def old_read_documents(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    return [d for d in text.split("\n\n") if d.strip()]


def old_split_documents(docs, share, seed):
    n_valid = max(1, round(len(docs) * share))
    held = set(torch.randperm(len(docs), generator=old_seeded(seed, len(docs)))[:n_valid].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def old_segments(docs, vocab, seq_len):
    tok, ids = make_tokenizer(vocab), []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
    body = seq_len - 2
    n = len(ids) // body
    seg = np.empty((n, seq_len), dtype=np.uint16)
    seg[:, 0], seg[:, -1] = vocab.index("[CLS]"), vocab.index("[SEP]")
    seg[:, 1:-1] = np.asarray(ids[: n * body], dtype=np.uint16).reshape(n, body)
    return seg


def old_pipeline(data: list[Path], valid: list[Path] | None, seq_len: int, seed: int = 0):
    docs = [d for f in data for d in old_read_documents(f)]
    if valid:
        held = [d for f in valid for d in old_read_documents(f)]
    else:
        docs, held = old_split_documents(docs, 0.01, seed)
    return old_segments(docs, VOCAB, seq_len), old_segments(held, VOCAB, seq_len)


def new_pipeline(data: list[Path], valid: list[Path] | None, seq_len: int, cache: Path, seed: int = 0):
    corpus = prepare.find_or_prepare([str(f) for f in data], [str(f) for f in valid] if valid else None, VOCAB,
                                     cache, 0.01, seed, log=lambda m: None)
    return prepare.open_corpus(corpus, VOCAB, seq_len)


def write_corpus(d: Path) -> list[Path]:
    """Uneven documents, whitespace-only ones, runs of blank lines, a .jsonl file: the edges of the old reader."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    words = ["the", "cat", "sat", "upon", "a", "mat", "and", "then", "ran", "away", "quickly", "unbelievable"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(3, 260)))) for _ in range(230)]
    text = ""
    for i, doc in enumerate(docs):
        text += doc + ("\n\n\n" if i % 17 == 0 else "\n  \n\n" if i % 23 == 0 else "\nline two\n\n")
    (d / "a.txt").write_text(text)
    (d / "b.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs[:40]))
    (d / "v.txt").write_text("\n\n".join(docs[-20:]))
    return [d / "a.txt", d / "b.jsonl", d / "v.txt"]


# ----------------------------------------------------------------------------- the same segments as before

@pytest.mark.parametrize("seq_len", [32, 128])
@pytest.mark.parametrize("held", ["valid file", "share"])
def test_windows_equal_the_old_segments_and_held_out_documents(tmp_path, seq_len, held):
    a, b, v = write_corpus(tmp_path / "text")
    valid = [v] if held == "valid file" else None
    old_train, old_valid = old_pipeline([a, b], valid, seq_len)
    train, valid_windows = new_pipeline([a, b], valid, seq_len, tmp_path / "cache")
    assert len(train) == len(old_train) and len(valid_windows) == len(old_valid)
    assert np.array_equal(train.all(), old_train) and np.array_equal(valid_windows.all(), old_valid)
    rows = np.array([5, 0, len(train) - 1, 5])                       # any order, repeats: what a batch asks for
    assert np.array_equal(train[rows], old_train[rows].astype(np.int64)) and train[rows].dtype == np.int64


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("held", ["valid.txt", "share"])
def test_the_reproductions_corpus_gives_the_same_segments_as_before(tmp_path, held):
    valid = [SHARED / "valid.txt"] if held == "valid.txt" else None
    old_train, old_valid = old_pipeline([SHARED / "train.txt"], valid, 128)
    train, valid_windows = new_pipeline([SHARED / "train.txt"], valid, 128, tmp_path)
    assert np.array_equal(train.all(), old_train) and np.array_equal(valid_windows.all(), old_valid)


def test_held_out_documents_are_fixed_random_and_never_trained_on():
    held = prepare.held_out(300, 0.01, seed=0)
    assert len(held) == 3 and held == prepare.held_out(300, 0.01, seed=0)
    assert held != {297, 298, 299} and held != prepare.held_out(300, 0.01, seed=1)


# ----------------------------------------------------------------------------- documents

def test_text_documents_split_exactly_like_str_split_across_chunk_edges(monkeypatch):
    import io
    text = "a\n\n\nb\n\nc \n \nd\n\n\n\n e\n\n" * 50 + "tail"
    want = [d for d in text.split("\n\n") if d.strip()]
    for size in (1, 2, 3, 7, 1 << 20):
        f = io.StringIO(text)
        read = f.read
        monkeypatch.setattr(f, "read", lambda n, read=read, size=size: read(size))
        assert list(prepare.text_documents(f)) == want, size


def test_jsonl_gz_crlf_bom_and_directory_corpora(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one doc"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "b.txt").write_bytes("\ufeffthree\r\nstill three\r\n\r\nfour\r\n".encode())     # an editor's file
    with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
        f.write("five\n\nsix")
    (tmp_path / "skip.csv").write_text("not, a, corpus")
    assert list(prepare.documents([str(tmp_path)])) == ["one doc", "two", "three\nstill three", "four\n", "five", "six"]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\nnot json\n')
    with pytest.raises(prepare.PrepareError, match="line 2"):
        list(prepare.documents([str(tmp_path / "bad.jsonl")]))


def test_hub_corpus_streams_a_local_dataset_in_batches(monkeypatch):
    datasets = pytest.importorskip("datasets")
    local = datasets.Dataset.from_dict({"text": ["first doc", "  ", "second doc"] * 700})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or local)
    docs = list(prepare.documents(["hf:wikitext:wikitext-2-raw-v1"]))
    assert docs == ["first doc", "second doc"] * 700
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "train"})]


# ----------------------------------------------------------------------------- the cache and bad input

def test_a_second_start_reads_no_text_and_a_changed_source_is_a_miss(tmp_path, monkeypatch):
    a, b, v = write_corpus(tmp_path / "text")
    first = prepare.find_or_prepare([str(a)], [str(v)], VOCAB, tmp_path / "cache", 0.01, 0, log=lambda m: None)
    monkeypatch.setattr(prepare, "documents", lambda specs: pytest.fail("read the text again"))
    assert prepare.find_or_prepare([str(a)], [str(v)], VOCAB, tmp_path / "cache", 0.01, 0, log=lambda m: None) == first
    monkeypatch.undo()
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))           # touched: same size, newer mtime
    second = prepare.find_or_prepare([str(a)], [str(v)], VOCAB, tmp_path / "cache", 0.01, 0, log=lambda m: None)
    assert second != first and (second / "meta.json").is_file()
    meta = json.loads((second / "meta.json").read_text())
    assert meta["sources"][0]["size"] == st.st_size and meta["dtype"] == "uint16"
    assert (second / "train.bin").stat().st_size == 2 * meta["train_tokens"]      # 2 bytes a token
    (second / "train.bin").write_bytes((second / "train.bin").read_bytes()[:-2])    # damaged derived data: rebuilt
    notes = []
    third = prepare.find_or_prepare([str(a)], [str(v)], VOCAB, tmp_path / "cache", 0.01, 0, log=notes.append)
    assert third == second and "rebuilding" in notes[0] and prepare.read_meta(third, VOCAB)


def test_prepared_corpus_refuses_truncated_foreign_and_other_vocab_files(tmp_path):
    a, _, v = write_corpus(tmp_path / "text")
    corpus = tmp_path / "corpus"
    prepare.prepare([str(a)], [str(v)], VOCAB, corpus, log=lambda m: None)
    other = VOCAB[:-1] + ["##zzz"]
    with pytest.raises(prepare.PrepareError, match="another vocabulary"):
        prepare.open_corpus(corpus, other, 32)
    (corpus / "valid.bin").write_bytes(b"\0\1\2")
    with pytest.raises(prepare.PrepareError, match="truncated or foreign"):
        prepare.open_corpus(corpus, VOCAB, 32)
    (corpus / "meta.json").write_text('{"format": 99}')
    with pytest.raises(prepare.PrepareError, match="not a prepared corpus of format 1"):
        prepare.open_corpus(corpus, VOCAB, 32)


def test_interrupted_prepare_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    a, _, v = write_corpus(tmp_path / "text")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "held_out", interrupt)                 # half-way: after the files were opened
    monkeypatch.setattr(prepare, "count_documents", lambda specs: 5)
    with pytest.raises(KeyboardInterrupt):
        prepare.find_or_prepare([str(a)], None, VOCAB, tmp_path / "cache", 0.01, 0, log=lambda m: None)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]     # an empty lock file, free


def _prepare_in_child(args):
    a, v, cache = args
    return str(prepare.find_or_prepare([a], [v], VOCAB, Path(cache), 0.01, 0, log=lambda m: None))


def test_jobs_sharing_a_cache_wait_for_one_prepare_and_clear_only_dead_leftovers(tmp_path):
    """Two jobs started together (run.sh's two pretrainings) get the same corpus, prepared once; a
    later start removes a killed prepare's temporary directory but never a live process's."""
    import multiprocessing as mp
    a, _, v = write_corpus(tmp_path / "text")
    cache = tmp_path / "cache"
    with mp.get_context("spawn").Pool(2) as pool:
        first, second = pool.map(_prepare_in_child, [(str(a), str(v), str(cache))] * 2)
    assert first == second and prepare.read_meta(Path(first), VOCAB)
    name = Path(first).name
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()                          # a pid that has exited
    for pid in (dead, str(os.getppid())):
        (cache / f".{name}.tmp-{pid}").mkdir()
        (cache / f".{name}.tmp-{pid}" / "train.bin").write_bytes(b"half")
    import shutil
    shutil.rmtree(first)                                                     # force a new prepare
    assert prepare.find_or_prepare([str(a)], [str(v)], VOCAB, cache, 0.01, 0, log=lambda m: None) == Path(first)
    assert not (cache / f".{name}.tmp-{dead}").exists()                      # the dead job's: cleared
    assert (cache / f".{name}.tmp-{os.getppid()}" / "train.bin").is_file()   # a live one's: left alone


@pytest.mark.parametrize("files, problem", [
    ({"empty.txt": "\n\n  \n"}, "holds no text"),
    ({"one.txt": "just one document"}, "holds one document"),
    ({"bin.txt": "abc\0def"}, "looks binary"),
    ({"latin.txt": b"caf\xe9 au lait\n\nsecond"}, "not UTF-8"),
    ({"short.txt": "a\n\nb"}, "fewer than one segment"),
])
def test_bad_corpora_are_one_line_exit_2_and_nothing_written(tmp_path, capsys, files, problem):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    args = ["--data", *(str(tmp_path / n) for n in files), "--preset", "tiny", "--max-steps", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "x.pt")]
    assert pretrain.main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("prepare: ")]  # the bar
    assert len(err) == 1 and err[0].startswith("pretrain.py: error: ") and problem in err[0], err
    assert not (tmp_path / "x.pt").exists()
    assert not list(tmp_path.glob("cache/.*tmp*"))                   # no half-written corpus


def test_prepare_command_then_pretrain_reads_the_directory(tmp_path, capsys):
    a, b, v = write_corpus(tmp_path / "text")
    out = tmp_path / "corpus"
    assert prepare.main(["--data", str(a), str(b), "--valid", str(v), "--out", str(out)]) == 0
    assert prepare.main(["--data", str(a), "--out", str(out)]) == 2                   # never overwrites
    assert "exists" in capsys.readouterr().err
    args = ["--data", str(out), "--preset", "tiny", "--seq-len", "32", "--batch-size", "8", "--max-steps", "2",
            "--out", str(tmp_path / "m.pt")]
    assert pretrain.main(args) == 0
    assert pretrain.main([*args[:2], "--valid", str(v), *args[2:], "--overwrite"]) == 2
    assert "is a prepared corpus: pass it alone as --data (it holds its own held-out text)" in capsys.readouterr().err


def test_prepare_command_never_replaces_what_it_did_not_make_and_cleans_up_after_a_kill(tmp_path, capsys):
    """--overwrite replaces a prepared corpus only; SIGTERM leaves no temporary directory; a SIGKILLed
    prepare's leftovers go with the next prepare of that --out; a file-size limit is one line."""
    import signal
    import time
    a, _, v = write_corpus(tmp_path / "text")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("a user's own work")
    assert prepare.main(["--data", str(a), "--out", str(mine), "--overwrite"]) == 2
    assert "not a prepared corpus (no meta.json)" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "a user's own work"
    out = tmp_path / "corpus"
    assert prepare.main(["--data", str(a), "--out", str(out)]) == 0
    assert prepare.main(["--data", str(a), "--valid", str(v), "--out", str(out), "--overwrite"]) == 0   # its own
    assert json.loads((out / "meta.json").read_text())["valid_documents"] > 0
    # a killed prepare (SIGKILL: no chance to clean) left a temporary directory; the next one removes it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".again.tmp-{dead}").mkdir()
    assert prepare.main(["--data", str(a), "--out", str(tmp_path / "again")]) == 0
    assert not (tmp_path / f".again.tmp-{dead}").exists()
    # SIGTERM half-way: the one line, exit 130, nothing left beside --out
    big = tmp_path / "big.txt"
    big.write_text((a.read_text() + "\n\n") * 60)
    proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--data", str(big), "--out", str(tmp_path / "t")],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".t.tmp-*")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.tmp-*"))
    # a file-size limit (ulimit -f): one line naming the problem, exit 2, nothing written
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            f"sys.path.insert(0, {str(ROOT)!r}); import prepare; "
            f"sys.exit(prepare.main(['--data', {str(big)!r}, '--out', {str(tmp_path / 'small')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("prepare.py: error: cannot write") and "ulimit -f" in r.stderr
    assert not (tmp_path / "small").exists() and not list(tmp_path.glob(".small.tmp-*"))


def test_a_hub_dataset_that_cannot_be_reached_is_one_line(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert prepare.main(["--data", "hf:wikitext:wikitext-2-raw-v1", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("prepare.py: error: could not load hf:wikitext:wikitext-2-raw-v1 from the Hugging Face hub "
                       "(ConnectionError): check the name and the network, or prepare it where there is one and pass "
                       "the directory")
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.tmp-*"))
