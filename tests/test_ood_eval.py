"""ood_eval.py: fixed masks, a model with a known answer, missing subsets, bad input."""
import gzip
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import ood_eval
from checkpoint import read_vocab, save_checkpoint, to_hf_bert
from common import portable_path
from model import BertConfig, BertForMaskedLM

ROOT = Path(__file__).resolve().parent.parent
SHARED_PILE = ROOT.parent / "shared" / "data" / "pile-ood" / "val.jsonl"
VOCAB = read_vocab(ROOT / "data" / "bert-base-uncased-vocab.txt")


def pile(path: Path, subsets=("ArXiv", "Github", "Ubuntu IRC"), n=3):
    lines = [json.dumps({"text": f"document {i} of {s}: the quick brown fox jumps over the lazy dog " * (i + 2),
                         "meta": {"pile_set_name": s}}) for s in subsets for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    for seed, experts in ((0, 0), (1, 4)):
        torch.manual_seed(seed)
        save_checkpoint(d / f"m{seed}.pt", BertForMaskedLM(BertConfig.preset("tiny", num_layers=1, num_experts=experts)),
                        vocab=VOCAB)
    return d


def run(tmp_path, *args):
    out = tmp_path / "ood.json"
    out.unlink(missing_ok=True)
    assert ood_eval.main([*args, "--out", str(out), "--seq-len", "32"]) == 0
    return json.loads(out.read_text())


def test_same_checkpoint_twice_identical_and_masks_shared(tmp_path, ckpts, capsys):
    data = pile(tmp_path / "p.jsonl")
    res = run(tmp_path, "--data", str(data), "--ckpt", str(ckpts / "m0.pt"), str(ckpts / "m0.pt"), str(ckpts / "m1.pt"),
              "--subsets", "ArXiv", "Github", "Ubuntu IRC", "DM Mathematics")
    a = res["results"][portable_path(ckpts / "m0.pt")]
    b = res["results"][portable_path(ckpts / "m1.pt")]
    assert a["ArXiv"]["log_likelihood"] != b["ArXiv"]["log_likelihood"]
    assert all(a[s]["masked_tokens"] == b[s]["masked_tokens"] > 0 for s in a)
    again = run(tmp_path, "--data", str(data), "--ckpt", str(ckpts / "m0.pt"), "--subsets", "ArXiv", "Github", "Ubuntu IRC")
    assert again["results"][portable_path(ckpts / "m0.pt")] == a
    assert res["absent_subsets"] == ["DM Mathematics"]                  # reported, not dropped silently
    assert "absent" in capsys.readouterr().out
    args = Namespace(seq_len=32, max_tokens_per_subset=0, seed=0)
    docs = ood_eval.read_pile(data, ["ArXiv", "Github"], 0)
    first, second = ood_eval.masked_inputs(docs, VOCAB, args), ood_eval.masked_inputs(docs, VOCAB, args)
    assert all(torch.equal(first[s][i], second[s][i]) for s in first for i in (0, 1))


@pytest.mark.equations
def test_known_model_gives_expected_log_likelihood(tmp_path):
    model = BertForMaskedLM(BertConfig.preset("tiny", num_layers=1))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()                      # every hidden state 0 -> logits = decoder bias
        model.decoder_bias.copy_(torch.randn(len(VOCAB)))
    save_checkpoint(tmp_path / "known.pt", model, vocab=VOCAB)
    data = pile(tmp_path / "p.jsonl", subsets=("Github",))
    res = run(tmp_path, "--data", str(data), "--ckpt", str(tmp_path / "known.pt"), "--subsets", "Github")
    docs = ood_eval.read_pile(data, ["Github"], 0)
    _, labels = ood_eval.masked_inputs(docs, VOCAB, Namespace(seq_len=32, max_tokens_per_subset=0, seed=0))["Github"]
    logp = model.decoder_bias.log_softmax(0)
    expected = logp[labels[labels != -100]].mean().item()
    got = res["results"][portable_path(tmp_path / "known.pt")]["Github"]
    assert got["log_likelihood"] == pytest.approx(expected, abs=1e-5)
    assert got["masked_tokens"] == int((labels != -100).sum())



@pytest.mark.equations
def test_padding_is_masked_out_of_the_score(ckpts):
    """A short window scored in a padded batch gives the same log-likelihood as scored alone,
    unpadded: the attention mask leaves the padding out (a model that attended to it would not)."""
    from checkpoint import load_checkpoint
    model, _ = load_checkpoint(ckpts / "m0.pt")
    model.eval()
    g = torch.Generator().manual_seed(7)
    long = torch.randint(1000, 3000, (1, 32), generator=g)
    short = torch.randint(1000, 3000, (1, 12), generator=g)
    labels_long, labels_short = torch.full_like(long, -100), torch.full_like(short, -100)
    labels_long[0, [3, 9, 20]] = long[0, [3, 9, 20]]
    labels_short[0, [2, 5, 10]] = short[0, [2, 5, 10]]
    padded = torch.cat([long, torch.cat([short, short.new_zeros(1, 20)], 1)])
    padded_labels = torch.cat([labels_long, torch.cat([labels_short, labels_short.new_full((1, 20), -100)], 1)])
    with torch.no_grad():
        total, count = ood_eval.score(model, padded, padded_labels, 2, False, torch.device("cpu"))
        alone = [ood_eval.score(model, x, y, 1, False, torch.device("cpu")) for x, y in
                 ((long, labels_long), (short, labels_short))]
    assert count == 6 == sum(n for _, n in alone)
    assert total == pytest.approx(sum(t for t, _ in alone), abs=1e-4)

def test_gzip_and_limits(tmp_path, ckpts):
    plain = pile(tmp_path / "p.jsonl", n=5)
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write(plain.read_text())
    res = run(tmp_path, "--data", str(tmp_path / "p.jsonl.gz"), "--ckpt", str(ckpts / "m0.pt"), "--subsets", "ArXiv",
              "--max-docs-per-subset", "2")
    docs = ood_eval.read_pile(tmp_path / "p.jsonl.gz", ["ArXiv"], 2)
    assert docs == ood_eval.read_pile(plain, ["ArXiv"], 2) and len(docs["ArXiv"]) == 2
    two_docs = ood_eval.windows(docs["ArXiv"], ood_eval.make_tokenizer(VOCAB), VOCAB, 32, max_tokens=0)
    assert res["results"][portable_path(ckpts / "m0.pt")]["ArXiv"]["windows"] == len(two_docs)
    few = ood_eval.windows(docs["ArXiv"] * 20, ood_eval.make_tokenizer(VOCAB), VOCAB, 32, max_tokens=100)
    assert few.shape[1] == 32 and 100 <= int((few > 103).sum()) < 100 + 30


def cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "ood_eval.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_bad_input_is_one_clear_line(tmp_path, ckpts):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "a", "meta": {}}) + "\n{not json\n")
    (tmp_path / "notext.jsonl").write_text(json.dumps({"meta": {"pile_set_name": "ArXiv"}}) + "\n")
    good = pile(tmp_path / "good.jsonl")
    ck = str(ckpts / "m0.pt")
    shape = tmp_path / "shape.json"
    shape.write_text('{"results": [1], "args": {}}')
    good_scores = {"log_likelihood": -5.0, "masked_tokens": 10, "windows": 2}
    inner = [{"m.pt": [1, 2]}, {"m.pt": {"ArXiv": 5}}, {"m.pt": {"ArXiv": {"log_likelihood": -5.0}}},
             {"m.pt": {"ArXiv": {**good_scores, "log_likelihood": "low"}}},
             {"m.pt": {"ArXiv": {**good_scores, "masked_tokens": 1.5}}}]
    for i, bad in enumerate(inner):                 # the right keys, the wrong things inside them
        (tmp_path / f"inner{i}.json").write_text(json.dumps({"results": bad, "args": {}}))
    cases = [(["--data", str(tmp_path / "empty.jsonl"), "--ckpt", ck], "is empty"),
             (["--data", str(tmp_path / "bad.jsonl"), "--ckpt", ck], "line 2: not valid JSON"),
             (["--data", str(tmp_path / "notext.jsonl"), "--ckpt", ck], "line 1: record has no 'text'"),
             (["--data", str(good), "--ckpt", ck, "--subsets", "Reddit"], "unknown subset 'Reddit'"),
             (["--data", str(good), "--ckpt", str(tmp_path / "missing.pt")], "not found"),
             (["--data", str(tmp_path / "nope.jsonl"), "--ckpt", ck], "not found"),
             (["--data", str(tmp_path / "plain.gz"), "--ckpt", ck], "cannot be read as UTF-8 JSON lines (.gz)"),
             (["--data", str(tmp_path / "latin1.jsonl"), "--ckpt", ck], "cannot be read as UTF-8"),
             (["--data", str(good), "--ckpt", ck, "--seq-len", "0"], "--seq-len 0 must be positive"),
             (["--data", str(good), "--ckpt", ck, "--seq-len", "100000"], "more than the 512 positions"),
             (["--data", str(good), "--ckpt", ck, "--batch-size", "0"], "--batch-size 0 must be positive"),
             (["--data", str(good), "--ckpt", ck, "--max-tokens-per-subset", "-1"], "must be 0 (all) or more"),
             (["--data", str(good), "--ckpt", ck, "--out", "/proc/nope/o.json"], "cannot write results"),
             (["--data", str(good), "--ckpt", ck, "--out", str(tmp_path)], "is a directory: pass a file path"),
             (["--data", str(good), "--ckpt", ck, "--out", str(shape)], "is not an ood_eval.py result")]
    cases += [(["--data", str(good), "--ckpt", ck, "--out", str(tmp_path / f"inner{i}.json")],
               "is not an ood_eval.py result") for i in range(len(inner))]
    (tmp_path / "notbert").mkdir()
    torch.manual_seed(0)
    bare = BertForMaskedLM(BertConfig.preset("tiny", num_layers=1))
    to_hf_bert(bare, tmp_path / "bare", VOCAB)
    (tmp_path / "bare" / "model.safetensors").write_bytes(b"")        # replaced below by an encoder-only file
    from safetensors.torch import save_file
    from checkpoint import _to_hf_state
    save_file({k: v for k, v in _to_hf_state(bare.state_dict(), bare.config).items() if k.startswith("bert.")},
              str(tmp_path / "bare" / "model.safetensors"))
    cases += [(["--data", str(good), "--ckpt", str(tmp_path / "notbert")], "not a Hugging Face BERT directory"),
              (["--data", str(good), "--ckpt", str(tmp_path / "bare")], "bare encoder without a masked-LM head")]
    (tmp_path / "plain.gz").write_text(good.read_text())
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({"text": "caf\u00e9"}).replace("\\u00e9", "\xe9").encode("latin-1"))
    for extra, words in cases:
        r = cli(*extra, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("ood_eval.py: error:") and words in r.stderr, r.stderr


def test_results_kept_per_checkpoint_rerun_skips_and_empty_subset_is_absent(tmp_path, ckpts, capsys, monkeypatch):
    data = pile(tmp_path / "p.jsonl")
    with data.open("a") as f:
        f.write(json.dumps({"text": "   ", "meta": {"pile_set_name": "StackExchange"}}) + "\n")
    out = tmp_path / "o.json"
    args = ["--data", str(data), "--ckpt", str(ckpts / "m0.pt"), str(ckpts / "m1.pt"), "--seq-len", "32",
            "--subsets", "ArXiv", "StackExchange", "--out", str(out)]
    real, calls = ood_eval.score_checkpoint, []

    def interrupted_at_second(path, *a):
        if calls:
            raise KeyboardInterrupt
        calls.append(path)
        return real(path, *a)

    monkeypatch.setattr(ood_eval, "score_checkpoint", interrupted_at_second)
    assert ood_eval.main(args) == 130
    first = json.loads(out.read_text())["results"]
    assert list(first) == [portable_path(ckpts / "m0.pt")]
    assert first[portable_path(ckpts / "m0.pt")]["StackExchange"] == {"log_likelihood": None, "masked_tokens": 0, "windows": 0}
    calls.clear()
    capsys.readouterr()
    monkeypatch.setattr(ood_eval, "score_checkpoint", lambda path, *a: calls.append(path) or real(path, *a))
    assert ood_eval.main(args) == 0
    assert calls == [str(ckpts / "m1.pt")]                              # only the missing checkpoint
    printed = capsys.readouterr().out
    assert "AX = ArXiv" in printed and "| - |" in printed               # the legend, and no fake 0.0
    plan = [line for line in printed.splitlines() if line.startswith("plan:")]   # the first screen says what it does
    assert plan == [f"plan: score 1 of 2 checkpoints on 2 Pile subsets (ArXiv, StackExchange), all their tokens, the same masks for "
                    f"every checkpoint; results: {out} (written after every checkpoint; the same command skips scored ones)"]
    assert printed.index("plan:") < printed.index("[2/2] scoring")


@pytest.mark.skipif(not SHARED_PILE.is_file(), reason="../shared/data/pile-ood not present")
def test_real_sample(tmp_path, ckpts):
    docs = ood_eval.read_pile(SHARED_PILE, ood_eval.PAPER_SUBSETS, 0)
    assert {s: len(d) for s, d in docs.items()} == {"ArXiv": 230, "DM Mathematics": 366, "Github": 207,
                                                    "StackExchange": 400, "Ubuntu IRC": 218}
    res = run(tmp_path, "--data", str(SHARED_PILE), "--ckpt", str(ckpts / "m0.pt"), "--max-docs-per-subset", "2",
              "--max-tokens-per-subset", "500")
    row = res["results"][portable_path(ckpts / "m0.pt")]
    assert set(row) == set(ood_eval.PAPER_SUBSETS) and all(-20 < r["log_likelihood"] < 0 for r in row.values())


def test_a_hugging_face_directory_scores_as_its_checkpoint_and_progress_is_shown(tmp_path, ckpts, capsys):
    """A dense checkpoint written as an HF BERT directory scores exactly as the .pt it came from; the
    run prints a line per checkpoint and per subset, and says when it skips a scored checkpoint."""
    from checkpoint import load_checkpoint
    mlm, _ = load_checkpoint(ckpts / "m0.pt")
    to_hf_bert(mlm, tmp_path / "hf", VOCAB)
    data = pile(tmp_path / "p.jsonl")
    res = run(tmp_path, "--data", str(data), "--ckpt", str(ckpts / "m0.pt"), str(tmp_path / "hf"))
    a, b = res["results"][portable_path(ckpts / "m0.pt")], res["results"][portable_path(tmp_path / "hf")]
    assert all(a[s]["log_likelihood"] == pytest.approx(b[s]["log_likelihood"], abs=1e-5) for s in a)
    printed = capsys.readouterr().out
    assert "[1/2] scoring" in printed and "[2/2] scoring" in printed
    assert not any(p.startswith("/") for p in res["args"]["ckpt"]) and not res["data"].startswith("/")
    out = tmp_path / "ood.json"
    assert ood_eval.main(["--data", str(data), "--ckpt", str(tmp_path / "hf"), "--seq-len", "32", "--out", str(out)]) == 0
    assert "already scored" in capsys.readouterr().out
