"""pretrain.py: masking, the three training modes, resume, the prepared corpus it reads, bad input."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain
from checkpoint import load_checkpoint, read_checkpoint, read_vocab, save_checkpoint
from model import BertConfig, BertForMaskedLM

ROOT = Path(__file__).resolve().parent.parent
VOCAB = read_vocab(ROOT / "data" / "bert-base-uncased-vocab.txt")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = (ROOT / "data" / "sample.txt").read_text().split("\n\n")
    (d / "train.txt").write_text("\n\n".join(docs[:3])[:60_000])
    (d / "valid.txt").write_text(docs[-1][:8_000])
    return d


def run(tmp_path, corpus, *extra, steps=30):
    args = ["--data", str(corpus / "train.txt"), "--valid", str(corpus / "valid.txt"), "--preset", "tiny",
            "--seq-len", "32", "--batch-size", "16", "--max-steps", str(steps), "--lr", "1e-3",
            "--log-every", "1", "--eval-every", "1000", "--cache-dir", str(tmp_path / "cache"), *extra]
    assert pretrain.main(args) == 0
    out = Path(extra[extra.index("--out") + 1])
    rows = [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "mlm" in r], out


@pytest.mark.parametrize("mode", ["vanilla", "moe", "tcd"])
def test_training_lowers_mlm_loss(tmp_path, corpus, mode):
    extra = ["--out", str(tmp_path / f"{mode}.pt")]
    if mode != "vanilla":
        extra += ["--moe", "--experts", "4"]
    if mode == "tcd":
        teacher = BertForMaskedLM(BertConfig.preset("tiny"))
        save_checkpoint(tmp_path / "teacher.pt", teacher, vocab=VOCAB)
        extra += ["--teacher", str(tmp_path / "teacher.pt"), "--relation-tokens", "256", "--relation-group", "32"]
    rows, out = run(tmp_path, corpus, *extra)
    first, last = sum(r["mlm"] for r in rows[:3]) / 3, sum(r["mlm"] for r in rows[-3:]) / 3
    assert last < first - 1.0, (first, last)
    if mode != "vanilla":
        assert all(r["balance"] > 0 for r in rows) and "load_max" in rows[-1]
    if mode == "tcd":
        assert all(r["trunk"] > 0 and r["inner"] > 0 and r["attention"] == 0 for r in rows)
    model, ckpt = load_checkpoint(out)
    assert ckpt["step"] == 30 and ckpt["vocab"] == VOCAB and ckpt["metrics"]["pretrain_perf"] < 0
    assert model.config.moe == (mode != "vanilla")


def test_resume_equals_uninterrupted_run(tmp_path, corpus):
    common = ["--moe", "--experts", "4"]
    full, full_out = run(tmp_path, corpus, *common, "--out", str(tmp_path / "full.pt"), steps=8)
    run(tmp_path, corpus, *common, "--out", str(tmp_path / "part.pt"), "--stop-at", "4", steps=8)
    rows, part_out = run(tmp_path, corpus, *common, "--out", str(tmp_path / "part.pt"),
                         "--resume", str(tmp_path / "part.pt"), steps=8)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in full], abs=1e-6)
    a, b = load_checkpoint(full_out)[0].state_dict(), load_checkpoint(part_out)[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_tcd_run(tmp_path, corpus):
    save_checkpoint(tmp_path / "teacher.pt", BertForMaskedLM(BertConfig.preset("tiny")), vocab=VOCAB)
    rows, out = run(tmp_path, corpus, "--moe", "--experts", "4", "--bf16", "--device", "cuda",
                    "--teacher", str(tmp_path / "teacher.pt"), "--lambda-a", "1", "--out", str(tmp_path / "g.pt"))
    first, last = sum(r["mlm"] for r in rows[:3]) / 3, sum(r["mlm"] for r in rows[-3:]) / 3
    assert last < first - 1.0 and all(r["attention"] > 0 for r in rows), (first, last)
    assert load_checkpoint(out)[1]["step"] == 30                   # loads on the CPU


def cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def bad_input_cases(tmp_path, corpus):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n\nsecond doc".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "number.jsonl").write_text('{"text": 5}\n')
    (tmp_path / "one.txt").write_text("a single document " * 50)
    save_checkpoint(tmp_path / "vocab.pt", BertForMaskedLM(BertConfig.preset("tiny")), vocab=VOCAB[:-1] + ["zzz"])
    save_checkpoint(tmp_path / "layers.pt", BertForMaskedLM(BertConfig.preset("tiny", num_layers=2)), vocab=VOCAB)
    save_checkpoint(tmp_path / "good.pt", BertForMaskedLM(BertConfig.preset("tiny")), vocab=VOCAB)
    (tmp_path / "exists.pt").write_bytes(b"a run somebody wants to keep")
    (tmp_path / "notbert").mkdir()
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\nhello\n")
    return [  # (flags added to a valid tiny MoE run, words in the one-line error)
        (["--data", str(tmp_path / "nope.txt")], "not found"),
        (["--data", str(tmp_path / "empty.txt")], "no text"),
        (["--data", str(tmp_path / "latin1.txt")], "not UTF-8"),
        (["--data", str(tmp_path / "binary.txt")], "binary"),
        (["--data", str(tmp_path / "number.jsonl")], "'text' string"),
        (["--data", str(tmp_path / "one.txt")], "holds one document"),
        (["--valid"], "expected at least one argument"),
        (["--teacher", str(tmp_path / "missing.pt")], "not found"),
        (["--teacher", str(tmp_path / "vocab.pt")], "vocabularies differ"),
        (["--teacher", str(tmp_path / "layers.pt")], "layers differ"),
        (["--resume", str(corpus / "train.txt")], "not a readable checkpoint"),
        (["--batch-size", "100000"], "--batch-size"),
        (["--batch-size", "0"], "--batch-size 0 must be positive"),
        (["--grad-accum", "0"], "--grad-accum 0 must be positive"),
        (["--grad-accum", "3"], "not a multiple of --grad-accum"),
        (["--seq-len", "100000"], "--seq-len 100000 must be from 3 to 512"),
        (["--seq-len", "2"], "--seq-len 2"),
        (["--epochs", "-1"], "--epochs -1 must be positive"),
        (["--max-steps", "-5"], "--max-steps -5 must be 0 or more"),
        (["--warmup-steps", "-1"], "--warmup-steps -1 must be 0 or more"),
        (["--lr", "0"], "--lr 0.0 must be positive"),
        (["--lr=-1e-3"], "must be positive"),
        (["--dropout", "1.5"], "--dropout 1.5 must be in [0, 1)"),
        (["--beta2", "1"], "--beta2 1.0 must be in [0, 1)"),
        (["--mask-prob", "0"], "--mask-prob 0.0 must be between 0 and 1"),
        (["--experts", "1"], "--moe needs --experts 2 or more"),
        (["--experts", "0"], "--moe needs --experts 2 or more"),
        (["--lambda-b", "-1"], "--lambda-b -1.0 must be 0 or more"),
        (["--relation-group", "0"], "--relation-group 0 must be positive"),
        (["--relation-tokens", "64", "--relation-group", "128"], "more than --relation-tokens"),
        (["--teacher", str(tmp_path / "good.pt"), "--relation-tokens", "9999", "--relation-group", "9999"],
         "tokens of a micro-batch"),
        (["--log-every", "0"], "--log-every 0 must be positive"),
        (["--short-seq-len", "5", "--short-seq-steps", "3"], "--short-seq-len 5 must divide --seq-len 32"),
        (["--out", str(tmp_path / "exists.pt")], "exists: continue it with --resume"),
        (["--out", str(tmp_path / "exists.pt"), "--overwrite"], "is not a checkpoint: --overwrite replaces only"),
        (["--out", "/proc/nope/x.pt"], "cannot write checkpoints"),
        (["--preset", "huge"], "invalid choice"),
        (["--lr", "inf"], "argument --lr: inf is not a finite number"),
        (["--lambda-t", "nan"], "argument --lambda-t: nan is not a finite number"),
        (["--beta2=-inf"], "argument --beta2: -inf is not a finite number"),
        (["--dropout", "0.1x"], "argument --dropout: invalid number '0.1x'"),
        (["--vocab", str(tmp_path / "vocab.txt")], "not a BERT WordPiece vocabulary: it has no [SEP], [MASK]"),
        (["--short-seq-len", "2", "--short-seq-steps", "3"], "no room for a token between [CLS] and [SEP]"),
        (["--short-seq-len", "8"], "needs both --short-seq-len and --short-seq-steps"),
        (["--short-seq-steps", "8"], "needs both --short-seq-len and --short-seq-steps"),
        (["--teacher", str(tmp_path / "notbert")], "not a Hugging Face BERT directory: expected config.json"),
        (["--epochs", "two"], "invalid int value"),
        (["--cache-dir", str(tmp_path / "exists.pt" / "cache")], "cannot write the token cache"),
        (["--out", str(tmp_path / "notbert")], "is a directory but not a checkpoint"),
        (["--routing", "top2"], "invalid choice"),
        (["--capacity-factor", "2"], "add --routing expert_choice"),
        (["--routing", "expert_choice", "--capacity-factor", "0"], "--capacity-factor 0.0 must be positive"),
        (["--routing", "expert_choice", "--capacity-factor", "-2"], "--capacity-factor -2.0 must be positive"),
        (["--routing", "expert_choice", "--capacity-factor", "nan"], "nan is not a finite number"),
        (["--routing", "expert_choice", "--lambda-b", "10"], "expert choice has no balance loss"),
        (["--mode-alpha", "-1"], "--mode-alpha -1.0 must be 0 or more"),
        (["--mode-alpha", "inf"], "inf is not a finite number"),
        (["--mode-tokens", "64"], "set --mode-alpha above 0 too"),
        (["--mode-alpha", "1", "--mode-tokens", "0"], "--mode-tokens 0 must be positive"),
    ]


def test_bad_input_is_one_clear_line(tmp_path, corpus, capsys):
    """Each bad input: one line naming it, exit code 2, nothing written, no traceback."""
    base = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--max-steps", "1", "--relation-group", "32",
            "--data", str(corpus / "train.txt"), "--moe", "--experts", "4", "--out", str(tmp_path / "x.pt"),
            "--cache-dir", str(tmp_path / "cache")]
    for extra, words in bad_input_cases(tmp_path, corpus):
        try:
            code = pretrain.main(base + extra)
        except SystemExit as e:                                         # argparse's own usage errors
            code = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and "Traceback" not in err and words in lines[-1], (extra, err)
        assert lines[-1].startswith("pretrain.py: error:"), (extra, err)
        assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.metrics.jsonl").exists(), extra
    assert (tmp_path / "exists.pt").read_bytes() == b"a run somebody wants to keep"
    r = cli(*base, "--lr", "-1", cwd=tmp_path)                         # the same from a shell
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("pretrain.py: error: --lr -1")


def test_resume_as_the_message_says_equals_uninterrupted_tcd_run(tmp_path, corpus):
    """Stop a TCD run, resume it with only the printed command: same losses, same weights, and
    the resumed run writes nothing but its own checkpoint and metrics."""
    save_checkpoint(tmp_path / "teacher.pt", BertForMaskedLM(BertConfig.preset("tiny")), vocab=VOCAB)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    flags = ["--data", str(corpus / "train.txt"), "--valid", str(corpus / "valid.txt"), "--preset", "tiny",
             "--seq-len", "32", "--batch-size", "16", "--grad-accum", "2", "--max-steps", "8", "--lr", "1e-3",
             "--warmup-steps", "2", "--beta2", "0.98", "--moe", "--experts", "4", "--teacher", str(tmp_path / "teacher.pt"),
             "--relation-tokens", "256", "--relation-group", "32", "--lambda-a", "1", "--log-every", "1",
             "--cache-dir", str(tmp_path / "cache")]
    full, _ = run(tmp_path, corpus, *flags, "--out", str(tmp_path / "full.pt"), steps=8)
    r = cli(*flags, "--out", "ckpt/moe_tcd.pt", "--stop-at", "3", cwd=run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    command = r.stdout.split("continue with ")[-1].split()                # python pretrain.py --resume PATH
    assert command[:2] == ["python", "pretrain.py"], command
    before = sorted(p.name for p in (run_dir / "ckpt").iterdir())
    r = cli(*command[2:], cwd=run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == before == ["moe_tcd.metrics.jsonl", "moe_tcd.pt"]
    rows = [json.loads(x) for x in (run_dir / "ckpt" / "moe_tcd.metrics.jsonl").read_text().splitlines()]
    rows = [x for x in rows if "mlm" in x]
    assert [x["step"] for x in rows] == list(range(1, 9))
    for part in (p for p in pretrain.PARTS if p != "mode"):                # no MoDE here: its part is not logged
        assert [x[part] for x in rows] == pytest.approx([x[part] for x in full], abs=1e-6), part
    assert all(x["trunk"] > 0 and x["attention"] > 0 for x in rows)     # the teacher came back with the run
    same_weights(tmp_path / "full.pt", run_dir / "ckpt" / "moe_tcd.pt", atol=1e-6)
    r = cli("--resume", "ckpt/moe_tcd.pt", "--batch-size", "32", cwd=run_dir)   # a flag that changes the run
    assert r.returncode == 2 and "--batch-size 32 differs from the run" in r.stderr, r.stderr


def test_resume_with_no_path_takes_out_and_a_fresh_run_starts_a_fresh_log(tmp_path, corpus):
    flags = ["--data", str(corpus / "train.txt"), "--preset", "tiny", "--seq-len", "32", "--batch-size", "16",
             "--max-steps", "6", "--log-every", "1", "--cache-dir", str(tmp_path / "cache"),
             "--out", str(tmp_path / "v.pt")]
    assert pretrain.main([*flags, "--stop-at", "2"]) == 0
    assert pretrain.main(["--resume", "--out", str(tmp_path / "v.pt")]) == 0
    assert torch.load(tmp_path / "v.pt", weights_only=True)["step"] == 6
    assert pretrain.main([*flags, "--max-steps", "3", "--overwrite"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "v.metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if "mlm" in x] == [1, 2, 3]          # nothing of the old run


# ----------------------------------------------------------------------------- torchrun, 2 ranks (gloo)

def torchrun(*args, cwd, nproc=2):
    from tests.test_moe import _free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", str(ROOT / "pretrain.py"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


# Adam divides by sqrt(v): where a gradient is a near-cancelling sum (the decoder rows of tokens that
# never occur), summation-order noise of ~1e-8 between W ranks and W-fold accumulation moves the
# update by up to ~1e-5 at lr 1e-3; a missing or mis-scaled all-reduce moves it by ~lr = 1e-3.
CROSS_WORLD_ATOL = 5e-5


def same_weights(a, b, atol=1e-5):
    sa, sb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]       # a .pt or a sharded directory
    assert sa.keys() == sb.keys()
    worst = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
    assert worst <= atol, worst


def test_two_ranks_equal_one_process_and_resume_on_any_world(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher = BertForMaskedLM(BertConfig.preset("tiny"))
    save_checkpoint(tmp_path / "teacher.pt", teacher, vocab=VOCAB)
    common = ["--data", str(corpus / "train.txt"), "--preset", "tiny", "--seq-len", "32", "--batch-size", "16",
              "--max-steps", "6", "--lr", "1e-3", "--moe", "--experts", "4", "--cache-dir", "cache",
              "--teacher", "teacher.pt", "--relation-tokens", "128", "--relation-group", "32"]
    r = torchrun(*common, "--grad-accum", "2", "--out", "two.pt", cwd=tmp_path)   # 4 micro-batches a step
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two.pt").iterdir()) == [      # each rank wrote its experts
        "common.pt", "experts-00000-of-00002.pt", "experts-00001-of-00002.pt"]
    assert pretrain.main([*common, "--grad-accum", "4", "--out", str(tmp_path / "one.pt")]) == 0
    same_weights(tmp_path / "one.pt", tmp_path / "two.pt", CROSS_WORLD_ATOL)
    one, _ = load_checkpoint(tmp_path / "two.pt")                    # loads whole in one process
    assert one.bert.layers[0].ffn.w1.shape[0] == 4
    r = torchrun(*common, "--grad-accum", "2", "--out", "part.pt", "--stop-at", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continue with torchrun --nproc_per_node=2 pretrain.py --resume" in r.stdout + r.stderr   # same ranks
    count = [l for l in r.stdout.splitlines() if "parameters," in l][0].split("~")[1].split()[0]
    assert count == f"{pretrain.parameter_count(BertForMaskedLM(BertConfig.preset('tiny', num_experts=4)), 1) / 1e6:.1f}M"
    r = torchrun(*common, "--out", "resumed2.pt", "--resume", "part.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    same_weights(tmp_path / "resumed2.pt", tmp_path / "two.pt")
    r = torchrun("--resume", "part.pt", "--out", "resumed4.pt", cwd=tmp_path, nproc=4)     # 1 micro-batch each
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "resumed4.pt").glob("experts-*-of-00004.pt"))) == 4
    same_weights(tmp_path / "resumed4.pt", tmp_path / "two.pt", CROSS_WORLD_ATOL)
    assert pretrain.main(["--resume", str(tmp_path / "part.pt"), "--out", str(tmp_path / "resumed1.pt")]) == 0
    assert (tmp_path / "resumed1.pt").is_file()                       # one process: one file again
    same_weights(tmp_path / "resumed1.pt", tmp_path / "two.pt", CROSS_WORLD_ATOL)


def test_experts_not_divisible_by_world_exit_cleanly(tmp_path, corpus):
    r = torchrun("--data", str(corpus / "train.txt"), "--preset", "tiny", "--seq-len", "32", "--batch-size", "4",
                 "--max-steps", "1", "--moe", "--experts", "3", "--cache-dir", "cache", "--out", "x.pt", cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.count("pretrain.py: error: 3 experts cannot be split evenly over 2 ranks") == 2, r.stderr


def test_ctrl_c_under_torchrun_ends_with_the_resume_line_and_no_rank_traceback(tmp_path, corpus):
    """Ctrl-C in a terminal signals the launcher and every rank at once: each rank saves its part,
    one line says how to resume, the ranks exit 130 and print no traceback. What torchrun prints
    after that (its own SignalException, exit 1) is the launcher's, and the README says so."""
    import os
    import signal
    import time
    from tests.test_moe import _free_port
    args = ["--data", str(corpus / "train.txt"), "--preset", "tiny", "--seq-len", "32", "--batch-size", "8",
            "--max-steps", "100000", "--log-every", "1", "--moe", "--experts", "4", "--cache-dir", "cache",
            "--out", "c.pt"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={_free_port()}", str(ROOT / "pretrain.py"), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = tmp_path / "c.metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)                            # what the terminal does on Ctrl-C
    out, _ = proc.communicate(timeout=120)
    assert "continue with torchrun --nproc_per_node=2 pretrain.py --resume c.pt" in out, out[-3000:]
    assert out.count("--resume c.pt") == 1
    assert not any(line.startswith("[rank") for line in out.splitlines()), out[-3000:]   # no rank traceback
    assert proc.returncode == 1 and "SignalException" in out     # torchrun's own ending, as the README says
    step = torch.load(tmp_path / "c.pt" / "common.pt", weights_only=True)["step"]
    assert step >= 3


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_save_and_say_how_to_resume(tmp_path, corpus, signame):
    import signal
    import time
    args = ["--data", str(corpus / "train.txt"), "--preset", "tiny", "--seq-len", "32", "--batch-size", "8",
            "--max-steps", "100000", "--log-every", "1", "--cache-dir", "cache", "--out", "c.pt"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "c.metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.2)
    sig = getattr(signal, signame)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert 3 <= ckpt["step"] < 100000 and "optimizer" in ckpt
    assert "python pretrain.py --resume c.pt" in out                   # says how to continue


def test_ctrl_c_while_tokenizing_is_one_line(tmp_path, corpus, monkeypatch):
    import prepare
    monkeypatch.setattr(prepare, "make_tokenizer", lambda vocab: (_ for _ in ()).throw(KeyboardInterrupt))
    code = pretrain.main(["--data", str(corpus / "train.txt"), "--preset", "tiny", "--seq-len", "32",
                          "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "k.pt")])
    assert code == 130 and not (tmp_path / "k.pt").exists()


def test_stop_epochs_keeps_the_schedule_and_keep_every_saves_evaluated_checkpoints(tmp_path, corpus):
    flags = ["--data", str(corpus / "train.txt"), "--valid", str(corpus / "valid.txt"), "--preset", "tiny",
             "--seq-len", "32", "--batch-size", "64", "--epochs", "4", "--log-every", "1", "--keep-epochs",
             "--keep-every", "3", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "s.pt")]
    assert pretrain.main([*flags, "--stop-epochs", "1"]) == 0                # 476 segments: 7 steps an epoch
    ckpt = torch.load(tmp_path / "s.pt", weights_only=True)
    assert ckpt["step"] == 7 and ckpt["scheduler"]["last_epoch"] == 7
    lr = [json.loads(x)["lr"] for x in (tmp_path / "s.metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert lr[-1] > 0.5 * max(lr)                                           # not decayed: sized for 4 epochs
    kept = torch.load(tmp_path / "s.step6.pt", weights_only=True)
    assert kept["step"] == 6 and kept["metrics"]["step"] == 6                # evaluated where it was kept
    assert torch.load(tmp_path / "s.epoch1.pt", weights_only=True)["metrics"]["epoch"] == 1.0
    assert pretrain.main(["--resume", str(tmp_path / "s.pt"), "--stop-epochs", "1"]) == 0   # nothing to do
    assert torch.load(tmp_path / "s.pt", weights_only=True)["step"] == 7
    assert pretrain.main(["--resume", str(tmp_path / "s.pt"), "--stop-epochs", "2"]) == 0
    assert torch.load(tmp_path / "s.pt", weights_only=True)["step"] == 14 and (tmp_path / "s.epoch2.pt").exists()


def test_short_sequence_curriculum_cuts_the_same_tokens(tmp_path):
    from types import SimpleNamespace
    seg = torch.randint(1000, 2000, (40, 32)).numpy().astype("uint16")
    args = SimpleNamespace(seed=0, batch_size=8, mask_prob=0.15, short_seq_len=8, short_seq_steps=2)
    run = SimpleNamespace(steps_per_epoch=5, train_seg=seg, args=args, vocab=VOCAB)
    special, mask_id = torch.tensor([0, 101, 102, 103, 100]), 103
    early = pretrain.global_batch(run, 1, special, mask_id)
    args.short_seq_steps = 0
    plain = pretrain.global_batch(run, 1, special, mask_id)
    assert early[0].shape == (32, 8) and plain[0].shape == (8, 32)
    assert torch.equal(early[0].reshape(8, 32), plain[0]) and torch.equal(early[1].reshape(8, 32), plain[1])
    args.short_seq_steps = 2
    assert pretrain.global_batch(run, 2, special, mask_id)[0].shape == (8, 32)   # back to full length


def test_sinusoid_position_init_has_berts_scale_and_smooth_neighbours():
    w = torch.empty(128, 128)
    pretrain.sinusoid_positions_(w)
    assert abs(w.pow(2).mean().sqrt().item() - 0.02) < 1e-6                    # root-mean-square = BERT std
    assert torch.allclose(w[5, 0], torch.tensor(0.02 * 2**0.5 * math.sin(5.0)))
    cos = torch.nn.functional.cosine_similarity(w[:-1], w[1:]).mean()
    far = torch.nn.functional.cosine_similarity(w[:64], w[64:]).mean()
    assert cos > 0.8 > far                                                   # neighbours start alike


# ----------------------------------------------------------------------------- Eq. 13: each λ weighs its own part

LAMBDAS = {"lambda_b": 7.0, "lambda_t": 0.5, "lambda_i": 3.0, "lambda_a": 0.25}   # all different, none 1
PART_OF = {"lambda_b": "balance", "lambda_t": "trunk", "lambda_i": "inner", "lambda_a": "attention"}


@pytest.mark.equations
def test_objective_gradient_wrt_each_part_is_its_own_lambda():
    """d objective / d part = that part's λ (1 for L_MLM), with distinct values for every part and
    every λ, so a dropped, swapped or duplicated weight changes some gradient."""
    values = {"mlm": 1.3, "balance": 0.07, "trunk": 0.11, "inner": 0.19, "attention": 0.23}
    parts = {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}
    tcd = {k: parts[k] for k in ("trunk", "inner", "attention")}
    total = pretrain.objective(parts["mlm"], parts["balance"], tcd, **LAMBDAS)
    total.backward()
    expected = values["mlm"] + sum(LAMBDAS[lam] * values[part] for lam, part in PART_OF.items())
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert parts["mlm"].grad.item() == pytest.approx(1.0)
    for lam, part in PART_OF.items():
        assert parts[part].grad.item() == pytest.approx(LAMBDAS[lam]), lam


@pytest.mark.equations
@pytest.mark.parametrize("mode", ["vanilla", "moe", "tcd", "tcd-without-attention"])
def test_logged_loss_is_eq13_of_its_logged_parts_and_absent_parts_are_zero(tmp_path, corpus, mode):
    """A real run with the λs given on the command line: every logged step's loss is Eq. 13 of its
    own logged parts; a dense model has no balance loss, a run without a teacher no relation loss."""
    lambdas = {**LAMBDAS, "lambda_a": 0.0} if mode == "tcd-without-attention" else LAMBDAS
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in lambdas.items()] + ["--out", str(tmp_path / f"{mode}.pt")]
    if mode != "vanilla":
        flags += ["--moe", "--experts", "4"]
    if mode.startswith("tcd"):
        save_checkpoint(tmp_path / "teacher.pt", BertForMaskedLM(BertConfig.preset("tiny")), vocab=VOCAB)
        flags += ["--teacher", str(tmp_path / "teacher.pt"), "--relation-tokens", "256", "--relation-group", "32"]
    rows, _ = run(tmp_path, corpus, *flags, steps=4)
    assert len(rows) == 4
    for r in rows:
        expected = r["mlm"] + sum(lambdas[lam] * r[part] for lam, part in PART_OF.items())
        assert r["loss"] == pytest.approx(expected, rel=1e-5), r
        assert (r["balance"] > 0) == (mode != "vanilla")
        assert all((r[p] > 0) == mode.startswith("tcd") for p in ("trunk", "inner")), r
        assert (r["attention"] > 0) == (mode == "tcd"), r           # L_A only where λA > 0


@pytest.mark.equations
def test_relation_tokens_are_sampled_as_asked_from_a_generator_of_seed_step_and_micro_batch(tmp_path, corpus,
                                                                                            monkeypatch):
    """Each micro-batch samples its share of --relation-tokens (a step's count, like the paper's 4096 per
    batch) in groups of --relation-group, from a generator seeded by (seed, step, micro-batch): a
    resumed or re-run step samples the same tokens."""
    calls, real = [], pretrain.sample_groups

    def spy(mask, tokens, group, generator=None):
        calls.append((tokens, group, generator.initial_seed()))
        return real(mask, tokens, group, generator)

    monkeypatch.setattr(pretrain, "sample_groups", spy)
    save_checkpoint(tmp_path / "teacher.pt", BertForMaskedLM(BertConfig.preset("tiny")), vocab=VOCAB)
    run(tmp_path, corpus, "--moe", "--experts", "4", "--teacher", str(tmp_path / "teacher.pt"), "--relation-tokens",
        "96", "--relation-group", "32", "--grad-accum", "2", "--seed", "3", "--out", str(tmp_path / "t.pt"), steps=2)
    expected = [(96 // 2, 32, pretrain.seeded(3, step, m, 2).initial_seed()) for step in range(2) for m in range(2)]
    assert calls == expected and len({c[2] for c in calls}) == 4


def test_a_hugging_face_directory_teaches_as_its_checkpoint(tmp_path, corpus):
    """--teacher takes an HF BERT directory: the same TCD run, loss for loss, as with the .pt."""
    from checkpoint import to_hf_bert
    torch.manual_seed(4)
    teacher = BertForMaskedLM(BertConfig.preset("tiny"))
    save_checkpoint(tmp_path / "teacher.pt", teacher, vocab=VOCAB)
    to_hf_bert(teacher, tmp_path / "teacher-hf", VOCAB)
    common = ["--moe", "--experts", "4", "--relation-tokens", "256", "--relation-group", "32"]
    a, _ = run(tmp_path, corpus, *common, "--teacher", str(tmp_path / "teacher.pt"), "--out", str(tmp_path / "a.pt"), steps=3)
    b, _ = run(tmp_path, corpus, *common, "--teacher", str(tmp_path / "teacher-hf"), "--out", str(tmp_path / "b.pt"), steps=3)
    for part in (p for p in pretrain.PARTS if p != "mode"):
        assert [r[part] for r in a] == pytest.approx([r[part] for r in b], abs=1e-6), part
    assert all(r["trunk"] > 0 for r in b)


def test_student_takes_its_teachers_preset_and_hints_keep_the_launcher(tmp_path, monkeypatch):
    teacher = tmp_path / "t.pt"
    save_checkpoint(teacher, BertForMaskedLM(BertConfig.preset("tiny")), vocab=VOCAB)   # no saved args: by shape
    assert pretrain.teacher_preset(str(teacher)) == "tiny"
    save_checkpoint(teacher, BertForMaskedLM(BertConfig.preset("tiny")), vocab=VOCAB, args={"preset": "base"})
    assert pretrain.teacher_preset(str(teacher)) == "base"                            # what it was trained with
    save_checkpoint(teacher, BertForMaskedLM(BertConfig.preset("tiny", num_layers=3)), vocab=VOCAB)
    with pytest.raises(pretrain.UsageError, match="no preset's shape .* pass --preset"):
        pretrain.teacher_preset(str(teacher))
    args, _ = pretrain.parse_args(["--moe"])
    pretrain.fill_defaults(args)
    assert args.preset == "small"
    assert pretrain.launcher(1) == "python pretrain.py"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert pretrain.launcher(2) == "torchrun --nproc_per_node=2 pretrain.py"
    assert pretrain.launcher(8) == "torchrun --nnodes=4 --nproc_per_node=2 pretrain.py"


def test_parameter_count_counts_dense_parameters_once_and_every_ranks_experts():
    model = BertForMaskedLM(BertConfig.preset("tiny", num_experts=4))
    experts = sum(p.numel() for p in model.parameters() if getattr(p, "expert", False))
    assert pretrain.parameter_count(model, 1) == sum(p.numel() for p in model.parameters())
    assert pretrain.parameter_count(model, 2) == pretrain.parameter_count(model, 1) + experts > 0


def test_a_resume_refuses_another_teacher_and_an_out_that_is_another_run(tmp_path, corpus, capsys):
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    save_checkpoint(teacher, BertForMaskedLM(BertConfig.preset("tiny")), vocab=VOCAB)
    run = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "8", "--max-steps", "4", "--relation-group", "32",
           "--relation-tokens", "64", "--data", str(corpus / "train.txt"), "--moe", "--experts", "4",
           "--teacher", str(teacher), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "s.pt")]
    assert pretrain.main([*run, "--stop-at", "1"]) == 0
    (tmp_path / "other.pt").write_bytes(b"another run")
    assert pretrain.main(["--resume", str(tmp_path / "s.pt"), "--out", str(tmp_path / "other.pt")]) == 2
    assert "is not the run being resumed" in capsys.readouterr().err
    assert (tmp_path / "other.pt").read_bytes() == b"another run"
    torch.manual_seed(1)                                     # same file name and shape, other weights
    save_checkpoint(teacher, BertForMaskedLM(BertConfig.preset("tiny")), vocab=VOCAB)
    assert pretrain.main(["--resume", str(tmp_path / "s.pt")]) == 2
    assert "now holds other weights" in capsys.readouterr().err.splitlines()[-1]
    assert read_checkpoint(tmp_path / "s.pt")["step"] == 1                 # the run is as it was


# ----------------------------------------------------------------------------- expert choice and MoDE

def test_moe_options_need_moe(tmp_path, corpus, capsys):
    base = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--max-steps", "1",
            "--data", str(corpus / "train.txt"), "--out", str(tmp_path / "x.pt"), "--cache-dir", str(tmp_path / "c")]
    for extra in (["--routing", "expert_choice"], ["--capacity-factor", "2"], ["--mode-alpha", "1"],
                  ["--mode-tokens", "8"]):
        assert pretrain.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"pretrain.py: error: {extra[0]} is a MoE setting"), err
        assert not (tmp_path / "x.pt").exists()


def test_mode_alpha_zero_is_todays_run_bit_for_bit(tmp_path, corpus):
    common = ["--moe", "--experts", "4", "--seed", "2"]
    rows, today = run(tmp_path, corpus, *common, "--out", str(tmp_path / "today.pt"), steps=5)
    rows0, zero = run(tmp_path, corpus, *common, "--mode-alpha", "0", "--out", str(tmp_path / "zero.pt"), steps=5)
    a, b = read_checkpoint(today)["model"], read_checkpoint(zero)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]
    assert strip(rows) == strip(rows0) and "mode" not in rows[0]
    _, mode = run(tmp_path, corpus, *common, "--mode-alpha", "0.5", "--out", str(tmp_path / "mode.pt"), steps=5)
    c = read_checkpoint(mode)["model"]
    assert not torch.equal(a["bert.layers.0.ffn.w1"], c["bert.layers.0.ffn.w1"])   # and α > 0 is not


@pytest.mark.equations
def test_mode_run_logs_its_part_and_the_loss_adds_alpha_times_it(tmp_path, corpus, monkeypatch):
    calls, real = [], pretrain.mutual_distillation

    def spy(model, taps, index):
        calls.append(index.clone())
        return real(model, taps, index)

    monkeypatch.setattr(pretrain, "mutual_distillation", spy)
    rows, out = run(tmp_path, corpus, "--moe", "--experts", "4", "--lambda-b", "3", "--mode-alpha", "7",
                    "--mode-tokens", "40", "--grad-accum", "2", "--out", str(tmp_path / "m.pt"), steps=3)
    for r in rows:
        assert r["mode"] > 0 and r["loss"] == pytest.approx(r["mlm"] + 3 * r["balance"] + 7 * r["mode"], rel=1e-5)
        assert len(r["layer_load_max"]) == 4 and all(v >= 1 for v in r["layer_load_max"])
    assert len(calls) == 6 and all(c.numel() == 20 and c.unique().numel() == 20 for c in calls)
    assert not torch.equal(calls[0], calls[1])                 # each micro-batch its own seeded sample
    assert read_checkpoint(out)["args"]["mode_alpha"] == 7.0


def test_expert_choice_run_trains_records_its_routing_and_resumes_as_itself(tmp_path, corpus, capsys):
    flags = ["--moe", "--experts", "4", "--routing", "expert_choice", "--capacity-factor", "2"]
    rows, out = run(tmp_path, corpus, *flags, "--out", str(tmp_path / "ec.pt"), steps=30)
    first, last = sum(r["mlm"] for r in rows[:3]) / 3, sum(r["mlm"] for r in rows[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert all(r["balance"] == 0 for r in rows)
    assert rows[-1]["load_max"] == rows[-1]["load_min"]          # every expert its k tokens
    assert len(rows[-1]["layer_unchosen"]) == 4 and all(1 <= v <= 4 for v in rows[-1]["layer_experts_per_token"])
    model, ckpt = load_checkpoint(out)
    assert ckpt["config"]["routing"] == "expert_choice" and ckpt["config"]["capacity_factor"] == 2.0
    ffn = model.bert.layers[0].ffn
    assert ffn.routing == "expert_choice" and ffn.capacity_factor == 2.0
    assert pretrain.main(["--resume", str(out), "--routing", "top1"]) == 2
    assert "--routing top1 differs from the run" in capsys.readouterr().err


def test_expert_choice_and_mode_two_ranks_equal_one_process(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--data", str(corpus / "train.txt"), "--preset", "tiny", "--seq-len", "32", "--batch-size", "16",
              "--max-steps", "4", "--lr", "1e-3", "--moe", "--experts", "4", "--cache-dir", "cache",
              "--routing", "expert_choice", "--mode-alpha", "0.5", "--mode-tokens", "64"]
    r = torchrun(*common, "--out", "two.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert pretrain.main([*common, "--grad-accum", "2", "--out", str(tmp_path / "one.pt")]) == 0
    same_weights(tmp_path / "one.pt", tmp_path / "two.pt", CROSS_WORLD_ATOL)
    import checkpoint
    assert checkpoint.main(["consolidate", str(tmp_path / "two.pt"), str(tmp_path / "whole.pt")]) == 0
    for path in ("two.pt", "whole.pt"):                                   # sharded and consolidated alike
        model, ckpt = load_checkpoint(tmp_path / path)
        assert model.bert.layers[0].ffn.routing == "expert_choice" and ckpt["args"]["mode_alpha"] == 0.5


# ----------------------------------------------------------------------------- runs that restart themselves

def test_auto_resume_starts_then_continues_and_refuses_resume_flags(tmp_path, corpus, capsys):
    common = ["--moe", "--experts", "4", "--auto-resume", "--out", str(tmp_path / "a.pt")]
    rows, out = run(tmp_path, corpus, *common, "--stop-at", "3", steps=6)          # nothing there: starts
    assert read_checkpoint(out)["step"] == 3
    rows, out = run(tmp_path, corpus, *common, steps=6)                             # there: continues
    _, whole = run(tmp_path, corpus, "--moe", "--experts", "4", "--out", str(tmp_path / "b.pt"), steps=6)
    same_weights(out, whole, atol=0)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for extra in (["--resume"], ["--overwrite"]):
        assert pretrain.main([*common, *extra]) == 2
        assert "--auto-resume decides by itself" in capsys.readouterr().err


def test_elastic_restart_after_a_killed_rank_equals_the_uninterrupted_run(tmp_path, corpus, monkeypatch):
    """torchrun --max-restarts=1 reruns the same command after rank 1 is killed mid-run (SIGKILL, as a
    lost node); --auto-resume picks up the last --save-every checkpoint and the run ends where the
    uninterrupted one does."""
    import os
    import signal
    import time
    from tests.test_moe import _free_port
    monkeypatch.chdir(tmp_path)
    common = ["--data", str(corpus / "train.txt"), "--preset", "tiny", "--seq-len", "32", "--batch-size", "16",
              "--max-steps", "40", "--lr", "1e-3", "--moe", "--experts", "4", "--cache-dir", "cache",
              "--log-every", "1", "--save-every", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           f"--master_port={_free_port()}", str(ROOT / "pretrain.py"), *common, "--auto-resume", "--out", "elastic.pt"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        metrics, deadline = tmp_path / "elastic.metrics.jsonl", time.time() + 120
        while (not metrics.exists() or len(metrics.read_text().splitlines()) < 10) and time.time() < deadline:
            time.sleep(0.02)
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2
        killed_at = len(metrics.read_text().splitlines())
        os.kill(int(ranks[-1]), signal.SIGKILL)                           # a rank lost mid-run
        out, _ = proc.communicate(timeout=300)
    finally:                                                              # never leave a launcher behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert killed_at < 40 and "resumed" in out and "elastic.pt" in out, out[-3000:]
    r = torchrun(*common, "--out", "straight.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    same_weights(tmp_path / "elastic.pt", tmp_path / "straight.pt")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "mlm" in line]
    assert steps == list(range(1, 41))                                    # the replayed steps are logged once


def test_two_nodes_on_one_machine_equal_one_process(tmp_path, corpus, monkeypatch):
    """Two torchrun launchers, one per "node", meeting by c10d rendezvous on localhost (as on a cluster
    with --nnodes 2 --rdzv-backend c10d), train as one process does."""
    from tests.test_moe import _free_port
    monkeypatch.chdir(tmp_path)
    common = ["--data", str(corpus / "train.txt"), "--preset", "tiny", "--seq-len", "32", "--batch-size", "16",
              "--max-steps", "4", "--lr", "1e-3", "--moe", "--experts", "4", "--cache-dir", "cache"]
    assert pretrain.main([*common, "--out", str(tmp_path / "ready.pt"), "--max-steps", "1"]) == 0   # the cache, once
    port = _free_port()
    launch = lambda node: subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=tcd-test", str(ROOT / "pretrain.py"), *common,
         "--out", "nodes.pt"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    nodes = [launch(0), launch(1)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:                                                              # never leave a launcher behind
        import os
        import signal
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert all(p.returncode == 0 for p in nodes), outs[0][-2000:] + outs[1][-2000:]
    assert pretrain.main([*common, "--grad-accum", "2", "--out", str(tmp_path / "one.pt")]) == 0
    same_weights(tmp_path / "nodes.pt", tmp_path / "one.pt", CROSS_WORLD_ATOL)


def test_warmup_steps_zero_starts_at_the_peak_and_decays_linearly(tmp_path, corpus):
    rows, _ = run(tmp_path, corpus, "--warmup-steps", "0", "--lr", "1e-3", "--out", str(tmp_path / "w.pt"), steps=4)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * (4 - s) / 4 for s in (1, 2, 3, 4)])
    rows, _ = run(tmp_path, corpus, "--warmup-steps", "2", "--lr", "1e-3", "--out", str(tmp_path / "w2.pt"), steps=4)
    # warm-up is capped at 10% of the schedule but at least one step: 1 here, then decay over the other 3
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * min(s + 1, (4 - s) / 3) for s in (1, 2, 3, 4)])


def test_prepared_corpora_are_checked_before_any_step(tmp_path, corpus, capsys):
    """Token ids past the vocabulary, a prepared corpus mixed with other sources, and a resume whose
    training data changed since the run began: one line each, before a step, nothing written."""
    import numpy as np
    import prepare
    good = tmp_path / "good"
    prepare.prepare([str(corpus / "train.txt")], [str(corpus / "valid.txt")], VOCAB, good, log=lambda m: None)
    bad = tmp_path / "bad"
    prepare.prepare([str(corpus / "train.txt")], [str(corpus / "valid.txt")], VOCAB, bad, log=lambda m: None)
    tokens = np.memmap(bad / "train.bin", dtype=np.uint16, mode="r+")
    tokens[len(tokens) // 2] = len(VOCAB) + 7                                # same size, a foreign id
    tokens.flush()
    base = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--max-steps", "2", "--out", str(tmp_path / "x.pt")]
    cases = [(["--data", str(bad)], f"holds token id {len(VOCAB) + 7:,}, beyond the vocabulary's {len(VOCAB):,}"),
             (["--data", str(good), str(corpus / "train.txt")], "is a prepared corpus: pass it alone as --data"),
             (["--data", str(corpus / "train.txt"), str(good)], "is a prepared corpus: pass it alone as --data"),
             (["--data", str(good), "--valid", str(corpus / "valid.txt")], "is a prepared corpus: pass it alone"),
             (["--data", str(corpus / "train.txt"), "--valid", str(good)], "is a prepared corpus: pass it alone")]
    for extra, words in cases:
        assert pretrain.main(base + extra + ["--cache-dir", str(tmp_path / "cache")]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("pretrain.py: error:") and words in err[-1], (extra, err)
        assert not (tmp_path / "x.pt").exists()
    # a run on good/, then good/ replaced by other text: the resume refuses
    assert pretrain.main(base + ["--data", str(good), "--stop-at", "1"]) == 0
    import os
    import shutil
    before = (tmp_path / "x.pt").read_bytes()
    # one token swapped for another valid id (same counts, same sizes): other data, refused
    tokens = np.memmap(good / "train.bin", dtype=np.uint16, mode="r+")
    tokens[3] = (int(tokens[3]) + 1) % len(VOCAB)
    tokens.flush()
    assert pretrain.main(["--resume", str(tmp_path / "x.pt")]) == 2
    assert "the training data changed since the run" in capsys.readouterr().err.strip().splitlines()[-1]
    tokens[3] = (int(tokens[3]) - 1) % len(VOCAB)
    tokens.flush()
    del tokens
    assert (tmp_path / "x.pt").read_bytes() == before
    # the same tokens copied elsewhere, with new mtimes (a cluster's scratch disk): the same data, resumed
    shutil.copytree(good, tmp_path / "moved")
    for f in (tmp_path / "moved").iterdir():
        os.utime(f, ns=(1, 1))
    assert pretrain.main(["--resume", str(tmp_path / "x.pt"), "--data", str(tmp_path / "moved"),
                          "--out", str(tmp_path / "moved.pt")]) == 0, capsys.readouterr().err[-500:]
    assert "resumed" in capsys.readouterr().out and (tmp_path / "moved.pt").is_file()
    # a text source rewritten with the same text (a new mtime: the cache prepares it again): resumed
    text = tmp_path / "text.txt"
    shutil.copy(corpus / "train.txt", text)
    cached = base[:-1] + [str(tmp_path / "t.pt"), "--data", str(text), "--cache-dir", str(tmp_path / "tc")]
    assert pretrain.main(cached + ["--stop-at", "1"]) == 0
    os.utime(text, ns=(7, 7))
    assert pretrain.main(["--resume", str(tmp_path / "t.pt")]) == 0, capsys.readouterr().err[-500:]
    assert len(list((tmp_path / "tc").glob("corpus-*"))) == 2
    shutil.rmtree(good)
    half = tmp_path / "half.txt"
    half.write_text((corpus / "train.txt").read_text()[:30_000])
    prepare.prepare([str(half)], [str(corpus / "valid.txt")], VOCAB, good, log=lambda m: None)
    before = (tmp_path / "x.pt").read_bytes()
    assert pretrain.main(["--resume", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the training data changed since the run" in err and "resume with the data it started with" in err
    assert (tmp_path / "x.pt").read_bytes() == before


def test_a_rank_file_one_rank_refuses_stops_every_rank_with_one_line(tmp_path, corpus, monkeypatch):
    """Under torchrun, a torn rank file makes every rank stop before a step (the ranks decide together),
    with the one line naming the file, printed once, and no gloo traceback."""
    monkeypatch.chdir(tmp_path)
    common = ["--data", str(corpus / "train.txt"), "--preset", "tiny", "--seq-len", "32", "--batch-size", "16",
              "--max-steps", "4", "--lr", "1e-3", "--moe", "--experts", "4", "--cache-dir", "cache"]
    r = torchrun(*common, "--out", "s.pt", "--stop-at", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    f = tmp_path / "s.pt" / "experts-00001-of-00002.pt"
    f.write_bytes(f.read_bytes()[:1000])                                  # torn
    r = torchrun("--resume", "s.pt", cwd=tmp_path)
    err = r.stdout + r.stderr
    assert r.returncode != 0
    assert err.count("pretrain.py: error:") == 1 and "experts-00001-of-00002.pt is not a readable checkpoint" in err, err
    assert "[rank" not in err and "gloo" not in err.lower(), err[-3000:]
    assert not (tmp_path / "s.metrics.jsonl").read_text().count('"step": 3')


def test_a_file_size_limit_or_full_disk_is_one_line_and_leaves_no_torn_checkpoint(tmp_path, corpus):
    """A checkpoint save that stops short (here a file-size limit, as ulimit -f or a full disk would): one line
    naming the checkpoint and what to do, exit 2, no temporary file and no torn checkpoint left."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000)); "
            f"sys.path.insert(0, {str(ROOT)!r}); import pretrain; sys.exit(pretrain.main(sys.argv[1:]))")
    args = ["--data", str(corpus / "train.txt"), "--preset", "tiny", "--seq-len", "32", "--batch-size", "4",
            "--max-steps", "2", "--moe", "--experts", "4", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "big.pt")]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert last.startswith(f"pretrain.py: error: cannot write or read {tmp_path / 'big.pt'}") and "ulimit -f" in last
    assert not (tmp_path / "big.pt").exists() and not list(tmp_path.glob(".big.pt*"))


@pytest.mark.equations
def test_mutual_distillation_is_the_mean_over_layers_of_each_layers_pair_loss_at_its_ffn_input():
    from tests.test_moe import mutual_distillation_loop
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.preset("tiny", num_layers=3, num_experts=3, vocab_size=100))
    ids = torch.randint(5, 100, (2, 9))
    taps = model.bert(ids, taps=True).taps
    index = torch.tensor([0, 4, 5, 11, 17])
    ffn_inputs = [layer_in.reshape(-1, 128)[index] for layer_in in taps["trunk"][0::2]]   # each layer's ln1 output
    want = sum(mutual_distillation_loop(layer.ffn, x) for layer, x in zip(model.bert.layers, ffn_inputs)) / 3
    assert pretrain.mutual_distillation(model, taps, index).item() == pytest.approx(want.item(), rel=1e-5)
