"""Checkpoint files: one `.pt` per run or a directory of per-rank expert shards, Hugging Face BERT
directories in and out, the vocabulary.

    save_checkpoint("ckpt/vanilla.pt", mlm, vocab=vocab, step=1000)   # atomic: temp file, then os.replace
    mlm, ckpt = load_checkpoint("ckpt/vanilla.pt")                     # a .pt, a sharded or a Hugging Face directory
    to_hf_bert(mlm, "hf/vanilla", ckpt["vocab"])                       # dense models: transformers loads it
    mlm = from_hf_bert("path/to/bert")                                 # config.json + weights
    python checkpoint.py consolidate ckpt/moe.pt ckpt/moe-one.pt       # a sharded checkpoint as one file
    python checkpoint.py export ckpt/vanilla.pt hf/vanilla             # a Hugging Face BERT directory

Every load is `torch.load(..., weights_only=True)`: a checkpoint is untrusted input. A checkpoint is
a dict: config (BertConfig as a dict), model (state dict, all experts), vocab, and what the writer
adds (step, epoch, metrics, optimizer, scheduler, rng, data_state, args). `read_checkpoint` takes a
sharded directory (an expert-parallel run's: each rank wrote its own experts) or a Hugging Face BERT
directory wherever a checkpoint is expected, and gives the same dict; with shard=(rank, world) it reads
only that rank's experts.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from common import InputFileError, remove_stale_temps, temp_prefix
from model import BertConfig, BertForMaskedLM, decay_split
from moe import SwitchFFN


class CheckpointError(InputFileError):
    """A file that is missing or is not a checkpoint of this project."""


BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def save_checkpoint(path, module: nn.Module, **extra) -> None:
    """torch.save of {config, model: state dict, **extra} to a temp file, then os.replace, so a
    crash never leaves a torn file. extra may replace `model`."""
    atomic_save({"config": asdict(module.config), "model": module.state_dict(), **extra}, path)


def atomic_save(state: dict, path) -> None:
    """torch.save to a temp file beside `path`, then os.replace onto it (a sharded directory there
    is swapped out the same way, see replace_path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)                          # a killed save's leftovers
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        write_torch(state, Path(tmp), path)
        replace_path(Path(tmp), path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_torch(state: dict, path: Path, target: Path | None = None) -> None:
    """torch.save to path, with a write that stopped short (a full disk, a file-size limit) as the OSError
    it is, naming target (the checkpoint being written): torch reports it as a RuntimeError of its zip writer."""
    try:
        torch.save(state, path)
    except (RuntimeError, OSError) as e:
        if isinstance(e, RuntimeError) and "pos" not in str(e) and "write" not in str(e):
            raise
        raise OSError(getattr(e, "errno", None) or errno.EIO, "the write stopped short: the disk is full or a "
                      "file-size limit was reached", str(target or path)) from None


def replace_path(new: Path, path: Path) -> None:
    """os.replace(new, path), also where one is a file and the other a directory (a run resumed on
    another world size changes the kind): the old one moves aside first and goes last, so a crash
    in between leaves it whole at .<name>.old (named in the not-found error) and never a torn one."""
    if not path.exists() or (path.is_dir() == new.is_dir() and not path.is_dir()):
        os.replace(new, path)
        return
    old = path.with_name(f".{path.name}.old")
    _remove(old)
    os.replace(path, old)
    os.replace(new, path)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def check_checkpoint_path(path) -> None:
    """Cheap early check that `path` can be a checkpoint (a file, or a directory with config.json)."""
    p = Path(path)
    if p.is_dir() and (p / "common.pt").is_file():
        return
    if p.is_dir() and not (p / "config.json").is_file():
        raise CheckpointError(f"{p} is a directory but not a Hugging Face BERT directory: expected config.json, "
                              "model.safetensors or pytorch_model.bin, and vocab.txt")
    if not p.exists():
        old = p.with_name(f".{p.name}.old")
        hint = f" ({old} is the previous one, left by an interrupted save: rename it to {p.name})" if old.exists() else ""
        raise CheckpointError(f"checkpoint {p} not found: pass a .pt file written by pretrain.py "
                              f"or a Hugging Face BERT directory{hint}")


def read_checkpoint(path, shard: tuple[int, int] = (0, 1)) -> dict:
    """The checkpoint dict of a .pt file (loaded with weights_only=True), of a sharded checkpoint
    directory (read_sharded) or of a Hugging Face BERT directory (read_hf_bert); CheckpointError
    naming what was expected if it is none of them. shard=(rank, world): a MoE's experts (weights and
    Adam moments) cut to that rank's contiguous share, as SwitchFFN holds them; (0, 1): all of them."""
    path = Path(path)
    check_checkpoint_path(path)
    if path.is_dir() and (path / "common.pt").is_file():
        return read_sharded(path, shard)
    if path.is_dir():
        return read_hf_bert(path)
    ckpt = _load(path, mmap=shard[1] > 1)         # mapped: a rank reads only its experts' pages
    if not {"config", "model"} <= ckpt.keys():
        raise CheckpointError(f"{path} is a torch file but not a checkpoint of this project "
                              "(no 'config'/'model'); pass a Hugging Face BERT directory as a directory")
    if shard[1] > 1:
        keys = expert_keys(BertConfig.from_dict(ckpt["config"]))
        lo, hi = expert_share(BertConfig.from_dict(ckpt["config"]).num_experts, *shard)
        cut = {k: t[lo:hi].clone() for k, t in _expert_tensors(ckpt, keys).items()}
        _set_expert_tensors(ckpt, keys, cut)
    return ckpt


def read_checkpoint_args(path) -> dict | None:
    """The run settings a pretrain.py checkpoint carries, without reading its weights."""
    path = Path(path)
    check_checkpoint_path(path)
    if path.is_dir():
        return _load(path / "common.pt").get("args") if (path / "common.pt").is_file() else None
    return _load(path, mmap=True).get("args")


def _load(path: Path, mmap: bool = False) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}): "
                              "pass a .pt file written by pretrain.py or a Hugging Face BERT directory") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is a torch file but not a checkpoint of this project (not a dict)")
    return ckpt


# ----------------------------------------------------------------------------- sharded checkpoints
# An expert-parallel run saves a directory where a one-process run saves its .pt file, and each rank
# writes only the experts it owns: no process ever holds another rank's experts, at save or at load
# (the base MoE's experts with their Adam moments are ~43 GB). Per-rank files as DeepSpeed-MoE and
# Megatron write them; not torch.distributed.checkpoint, whose .metadata file is read by pickle.load
# and so could run code from an untrusted checkpoint.
#   moe.pt/common.pt                  rank 0: the checkpoint dict without the expert tensors
#   moe.pt/experts-R-of-W.pt          rank R: its experts lo..hi of every MoE layer, weights and Adam moments
# The directory is written under a temporary name and swapped in complete (replace_path).

MOMENTS = ("exp_avg", "exp_avg_sq")


def expert_keys(cfg: BertConfig) -> list[str]:
    """State-dict names of the [E, ...] expert tensors (from a model on the meta device: no memory)."""
    with torch.device("meta"):
        model = BertForMaskedLM(cfg)
    return [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, SwitchFFN) for p in ("w1", "b1", "w2", "b2")]


def optimizer_index(cfg: BertConfig) -> dict[str, int]:
    """Parameter name -> its index in the optimizer's state, as model.adamw_warmup_linear orders them."""
    with torch.device("meta"):
        decay, plain = decay_split(BertForMaskedLM(cfg))
    return {n: i for i, n in enumerate(decay + plain)}


def world_sizes(num_experts: int) -> list[int]:
    """The world sizes that can hold these experts: the divisors of their number."""
    return [w for w in range(1, num_experts + 1) if num_experts % w == 0]


def expert_share(num_experts: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous experts lo..hi-1 that rank holds, as SwitchFFN splits them."""
    if num_experts % world:
        raise CheckpointError(f"{num_experts} experts cannot be split evenly over {world} ranks: use a world size "
                              f"that divides them ({', '.join(map(str, world_sizes(num_experts)))})")
    n = num_experts // world
    return rank * n, (rank + 1) * n


def _expert_tensors(ckpt: dict, keys: list[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's expert tensors by name: weights as `key`, Adam moments as `key:exp_avg`."""
    out = {k: ckpt["model"][k] for k in keys}
    state = (ckpt.get("optimizer") or {}).get("state", {})
    for k, i in optimizer_index(BertConfig.from_dict(ckpt["config"])).items():
        if k in out and i in state:
            out.update({f"{k}:{m}": state[i][m] for m in MOMENTS if m in state[i]})
    return out


def _set_expert_tensors(ckpt: dict, keys: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Put tensors (as _expert_tensors names them) into the checkpoint dict, in place."""
    ckpt["model"].update({k: tensors[k] for k in keys})
    state = (ckpt.get("optimizer") or {}).get("state", {})
    for k, i in optimizer_index(BertConfig.from_dict(ckpt["config"])).items():
        if k in keys and i in state:
            state[i] = {**state[i], **{m: tensors[f"{k}:{m}"] for m in MOMENTS if f"{k}:{m}" in tensors}}


def save_sharded(path, model: BertForMaskedLM, optimizer, rank: int, world: int, **extra) -> None:
    """The checkpoint of an expert-parallel run as a directory of per-rank files (collective: every
    rank calls it). Rank 0 writes common.pt, the dict save_checkpoint would write less the experts."""
    import torch.distributed as dist
    path = Path(path)
    name = [f"{temp_prefix(path)}{time.time_ns()}.tmp" if rank == 0 else None]
    dist.broadcast_object_list(name)                  # one directory for all ranks
    tmp = path.parent / name[0]
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp.mkdir()
    dist.barrier()
    try:
        ckpt = {"config": asdict(model.config), "model": model.state_dict(), "optimizer": optimizer.state_dict()}
        keys = expert_keys(model.config)
        mine = _expert_tensors(ckpt, keys)
        lo, hi = expert_share(model.config.num_experts, rank, world)
        write_torch({"experts": [lo, hi], "tensors": mine, "save_id": name[0], "rank": rank, "world": world},
                    tmp / f"experts-{rank:05d}-of-{world:05d}.pt", path)
        if rank == 0:
            ckpt["model"] = {k: v for k, v in ckpt["model"].items() if k not in keys}
            state, index = dict(ckpt["optimizer"]["state"]), optimizer_index(model.config)
            for i in (index[k] for k in keys if index[k] in state):   # the moments stay in the rank files
                state[i] = {m: v for m, v in state[i].items() if m not in MOMENTS}
            ckpt["optimizer"] = {**ckpt["optimizer"], "state": state}
            write_torch({**ckpt, **extra, "shards": world, "save_id": name[0]}, tmp / "common.pt", path)
        dist.barrier()                                 # every file written before the swap
        if rank == 0:
            replace_path(tmp, path)
    finally:
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
    dist.barrier()


def read_sharded(path: Path, shard: tuple[int, int] = (0, 1)) -> dict:
    """A sharded checkpoint directory as one checkpoint dict, holding the experts of `shard`
    (rank, world) only: each rank file is memory-mapped and only the pages of those experts read."""
    ckpt = _load(path / "common.pt")
    world = ckpt.pop("shards", None)
    if not isinstance(world, int) or world < 1 or not {"config", "model"} <= ckpt.keys():
        raise CheckpointError(f"{path / 'common.pt'} is not the common file of a sharded checkpoint: copy the "
                              "whole directory again")
    cfg = BertConfig.from_dict(ckpt["config"])
    keys = expert_keys(cfg)
    files = verify_shards(path, world, ckpt.pop("save_id", None), cfg, keys)
    lo, hi = expert_share(cfg.num_experts, *shard)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:                                  # one rank file at a time: peak = the share + one file
        a, b = expert_share(cfg.num_experts, int(f.name.split("-")[1]), world)
        if b <= lo or a >= hi:
            continue
        whole = (a, b) == (lo, hi)                   # the world it was saved on: the file is the share
        part = _load(f, mmap=not whole)
        if part.get("experts") != [a, b]:
            raise CheckpointError(f"{f} does not hold experts {a}..{b - 1}: copy the whole directory again")
        for k, t in part["tensors"].items():
            if whole:
                tensors[k] = t
                continue
            out = tensors.setdefault(k, torch.empty(hi - lo, *t.shape[1:], dtype=t.dtype))
            out[max(lo, a) - lo:min(hi, b) - lo].copy_(t[max(lo, a) - a:min(hi, b) - a])
        del part
    if any(t.shape[0] != hi - lo for t in tensors.values()) or not set(keys) <= tensors.keys():
        raise CheckpointError(f"{path}: the rank files do not hold experts {lo}..{hi - 1} of every layer: "
                              "copy the whole directory again")
    _set_expert_tensors(ckpt, keys, tensors)
    return ckpt


def verify_shards(path: Path, world: int, save_id: str | None, cfg: BertConfig, keys: list[str]) -> list[Path]:
    """Every rank file of a sharded checkpoint, checked against common.pt before any tensor is used: the
    names world asks for and no other, each readable (mapped, not read), of the same save, holding its own
    rank's experts in the shapes the config gives. CheckpointError naming the first file that is not."""
    want = [path / f"experts-{r:05d}-of-{world:05d}.pt" for r in range(world)]
    foreign = sorted(set(path.glob("experts-*.pt")) - set(want))
    missing = [f for f in want if not f.is_file()]
    if missing or foreign:
        f = (missing or foreign)[0]
        raise CheckpointError(f"{f} is {'missing' if missing else 'not part of this save'} (common.pt says {world} "
                              f"rank files): copy the whole directory again")
    shapes = _expert_shapes(cfg, keys)
    for r, f in enumerate(want):
        part = _load(f, mmap=True)
        lo, hi = expert_share(cfg.num_experts, r, world)
        if save_id is not None and part.get("save_id") != save_id:
            raise CheckpointError(f"{f} is from another save than common.pt (stale, or copied from another run): "
                                  "copy the whole directory again")
        if part.get("rank", r) != r or part.get("world", world) != world or part.get("experts") != [lo, hi]:
            raise CheckpointError(f"{f} holds rank {part.get('rank')} of {part.get('world')} (experts "
                                  f"{part.get('experts')}), not rank {r} of {world}: was it renamed? Copy the whole "
                                  "directory again")
        tensors = part.get("tensors")
        bad = [k for k in keys if not isinstance(tensors, dict) or k not in tensors
               or tuple(tensors[k].shape) != (hi - lo, *shapes[k][1:])]
        if bad:
            raise CheckpointError(f"{f} does not hold {bad[0]} in the shape the config gives: it is damaged or "
                                  "from another model; copy the whole directory again")
        del part
    return want


def _expert_shapes(cfg: BertConfig, keys: list[str]) -> dict[str, torch.Size]:
    """Each expert tensor's full shape (all experts) for this config, without allocating the model."""
    with torch.device("meta"):
        model = BertForMaskedLM(cfg)
    state = model.state_dict()
    return {k: state[k].shape for k in keys}


def read_hf_bert(directory) -> dict:
    """A Hugging Face BERT directory (config.json, weights, vocab.txt) as a checkpoint dict of this
    project: config, model, vocab (None without vocab.txt), and mlm_head (False when the weights
    hold a bare encoder, whose head is then random)."""
    d = Path(directory)
    check_checkpoint_path(d)
    model, has_head = _hf_bert(d)
    vocab = read_vocab(d / "vocab.txt") if (d / "vocab.txt").is_file() else None
    if vocab is not None and len(vocab) != model.config.vocab_size:
        raise CheckpointError(f"{d}: vocab.txt has {len(vocab):,} tokens but config.json says vocab_size "
                              f"{model.config.vocab_size:,}")
    return {"config": asdict(model.config), "model": model.state_dict(), "vocab": vocab, "mlm_head": has_head,
            "hf_dir": str(d)}


def load_checkpoint(path) -> tuple[BertForMaskedLM, dict]:
    """(BertForMaskedLM with the saved weights, the checkpoint dict)."""
    ckpt = read_checkpoint(path)
    model = BertForMaskedLM(BertConfig.from_dict(ckpt["config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the saved config: {str(e).splitlines()[0]}") from None
    return model, ckpt


def load_classifier(path):
    """(BertForSequenceClassification, its checkpoint dict) from a model.pt that finetune.py --save kept."""
    from model import BertForSequenceClassification
    ckpt = _load(Path(path)) if Path(path).is_file() else read_checkpoint(path)
    if "num_labels" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a fine-tuned model kept by finetune.py --save")
    model = BertForSequenceClassification(BertConfig.from_dict(ckpt["config"]), ckpt["num_labels"], ckpt["adapter_size"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def read_vocab(path) -> list[str]:
    """A WordPiece vocab.txt as a list (line number = token id)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocab file {path} not found: pass a WordPiece vocab.txt")
    try:
        tokens = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise InputFileError(f"vocab file {path} is not UTF-8 text: pass a WordPiece vocab.txt") from None
    tokens = tokens[:-1] if tokens and tokens[-1] == "" else tokens
    missing = [t for t in BERT_SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise InputFileError(f"{path} is not a BERT WordPiece vocabulary: it has no {', '.join(missing)} "
                             f"(pass a vocab.txt such as data/bert-base-uncased-vocab.txt)")
    return tokens


def make_tokenizer(vocab: list[str]):
    """BERT uncased WordPiece tokenizer (`tokenizers`) over a vocab list (line = id)."""
    from tokenizers import BertWordPieceTokenizer
    return BertWordPieceTokenizer({t: i for i, t in enumerate(vocab)}, lowercase=True)


def from_hf_bert(directory) -> BertForMaskedLM:
    """A BertForMaskedLM from a Hugging Face BERT directory: config.json plus model.safetensors
    (needs the optional `safetensors` package) or pytorch_model.bin. Without an MLM head in
    the weights (a bare BertModel), the head keeps its random initialisation."""
    return _hf_bert(Path(directory))[0]


def _hf_bert(d: Path) -> tuple[BertForMaskedLM, bool]:
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d} has no config.json: pass a Hugging Face BERT model directory")
    cfg = _hf_config_of(d)
    hf_state = _hf_weights(d)
    hf_state = {k.removeprefix("bert."): v for k, v in hf_state.items()}
    model = BertForMaskedLM(cfg)
    try:
        missing, _ = model.load_state_dict(_convert_hf_state(hf_state, cfg), strict=False)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{d}: weights do not match a BERT of its config.json "
                              f"({str(e).splitlines()[0][:200]})") from None
    if any(k.startswith("bert.") for k in missing):
        raise CheckpointError(f"{d}: encoder weights missing from the file: {missing[:3]}")
    return model, "decoder_bias" not in missing


def _hf_config_of(d: Path) -> BertConfig:
    """config.json as a BertConfig; CheckpointError naming what is wrong with it."""
    try:
        hf = json.loads((d / "config.json").read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / 'config.json'} is not valid JSON ({str(e).splitlines()[0]}): "
                              "was it cut off mid-write? Copy it again") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{d / 'config.json'} is not a JSON object: pass a Hugging Face BERT config")
    if hf.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{d}: model_type {hf['model_type']!r} is not supported (only 'bert')")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{d}: hidden_act {hf['hidden_act']!r} is not supported (only 'gelu')")
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings")
    missing = [k for k in need if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool) or hf[k] <= 0]
    if missing:
        raise CheckpointError(f"{d / 'config.json'}: {', '.join(missing)} missing or not a positive whole number")
    if hf["hidden_size"] % hf["num_attention_heads"]:
        raise CheckpointError(f"{d / 'config.json'}: hidden_size {hf['hidden_size']} is not a multiple of "
                              f"num_attention_heads {hf['num_attention_heads']}")
    try:
        return BertConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                          num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                          intermediate_size=hf["intermediate_size"], max_position=hf["max_position_embeddings"],
                          type_vocab_size=int(hf.get("type_vocab_size", 2)),
                          dropout=float(hf.get("hidden_dropout_prob", 0.1)),
                          attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
                          layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)), pad_token_id=int(hf.get("pad_token_id", 0) or 0))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{d / 'config.json'}: a field has the wrong type ({e})") from None


def _hf_weights(d: Path) -> dict:
    """The weights file's tensors; CheckpointError when it is truncated or not a weights file."""
    if (d / "model.safetensors").is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError("reading model.safetensors needs the safetensors package: "
                                  "pip install safetensors") from None
        path, load = d / "model.safetensors", lambda p: load_file(str(p))
    elif (d / "pytorch_model.bin").is_file():
        path, load = d / "pytorch_model.bin", lambda p: torch.load(p, map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{d} has neither model.safetensors nor pytorch_model.bin")
    try:
        state = load(path)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable weights file ({type(e).__name__}): is it truncated? "
                              "Download or copy it again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors: pass the model's weights file")
    return state


def to_hf_bert(mlm: BertForMaskedLM, directory, vocab: list[str] | None = None) -> None:
    """Write a dense model as a Hugging Face BERT directory (config.json, model.safetensors, and
    vocab.txt when given) that transformers.BertForMaskedLM.from_pretrained loads with the same
    logits. Written into a temp directory and renamed, so a crash leaves no half directory."""
    _check_dense(mlm.config, directory)
    _write_hf_dir(directory, _hf_config(mlm.config, "BertForMaskedLM"), _to_hf_state(mlm.state_dict(), mlm.config), vocab)


def to_hf_classifier(model: nn.Module, directory, vocab: list[str] | None = None,
                     labels: list[str] | None = None) -> None:
    """Write a fully fine-tuned dense BertForSequenceClassification (model.py) as a Hugging Face
    directory that transformers.BertForSequenceClassification.from_pretrained loads with the same
    logits; num_labels 1 is regression, as in transformers."""
    cfg = model.config
    _check_dense(cfg, directory)
    if model.adapter_size:
        raise CheckpointError("a model fine-tuned with adapters cannot be written as a Hugging Face BERT (that "
                              "format has no adapters): keep its .pt, or fine-tune with --adapter 0")
    n = model.num_labels
    names = labels if labels and len(labels) == n else [f"LABEL_{i}" for i in range(n)]
    extra = {"num_labels": n, "id2label": dict(enumerate(names)), "label2id": {v: i for i, v in enumerate(names)},
             "problem_type": "regression" if n == 1 else "single_label_classification"}
    s = model.state_dict()
    state = _to_hf_state(s, cfg, head=False)
    state.update({"bert.pooler.dense.weight": s["pooler.weight"], "bert.pooler.dense.bias": s["pooler.bias"],
                  "classifier.weight": s["classifier.weight"], "classifier.bias": s["classifier.bias"]})
    _write_hf_dir(directory, _hf_config(cfg, "BertForSequenceClassification", **extra),
                  {k: v.detach().clone().contiguous() for k, v in state.items()}, vocab)


def _check_dense(cfg: BertConfig, directory) -> None:
    d = Path(directory)
    if cfg.moe:
        raise CheckpointError(f"a MoE model ({cfg.num_experts} experts) cannot be written as a Hugging Face BERT: "
                              "that format has one dense FFN per layer, no router and no experts")
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise CheckpointError(f"{d} exists and is not an empty directory: pass a new directory")


def _hf_config(cfg: BertConfig, architecture: str, **extra) -> dict:
    return {"architectures": [architecture], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu", "max_position_embeddings": cfg.max_position,
            "type_vocab_size": cfg.type_vocab_size, "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.attention_dropout, "layer_norm_eps": cfg.layer_norm_eps,
            "pad_token_id": cfg.pad_token_id, "initializer_range": 0.02, "position_embedding_type": "absolute",
            "tie_word_embeddings": True, **extra}


HF_FILES = {"config.json", "model.safetensors", "vocab.txt"}          # what an export writes, and nothing else


def _write_hf_dir(directory, config: dict, state: dict, vocab: list[str] | None) -> None:
    """config, weights and vocabulary into a new directory (or over an earlier export), atomically."""
    from safetensors.torch import save_file
    if vocab is not None and len(vocab) != config["vocab_size"]:
        raise CheckpointError(f"the vocabulary has {len(vocab):,} tokens but the model's embeddings {config['vocab_size']:,}: "
                              "export the checkpoint with the vocabulary it was trained with")
    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=d.name + ".", suffix=".tmp"))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if vocab is not None:
            (tmp / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
        if d.exists():
            d.rmdir()
        os.replace(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hf_names(cfg: BertConfig, head: bool = True) -> list[tuple[str, str]]:
    """(our name, HF's name without the "bert." prefix) of every weight but the fused qkv; head: the MLM head's too."""
    pairs = [("bert.word.weight", "embeddings.word_embeddings.weight"),
             ("bert.position.weight", "embeddings.position_embeddings.weight"),
             ("bert.token_type.weight", "embeddings.token_type_embeddings.weight")]
    sublayers = [("bert.ln", "embeddings.LayerNorm")] + [
        (f"bert.layers.{i}.{ours}", f"encoder.layer.{i}.{hf}") for i in range(cfg.num_layers)
        for ours, hf in (("attn_out", "attention.output.dense"), ("ln1", "attention.output.LayerNorm"),
                         ("ffn.fc1", "intermediate.dense"), ("ffn.fc2", "output.dense"), ("ln2", "output.LayerNorm"))]
    if head:
        sublayers += [("transform", "cls.predictions.transform.dense"), ("transform_ln", "cls.predictions.transform.LayerNorm")]
    pairs += [(f"{ours}.{t}", f"{hf}.{t}") for ours, hf in sublayers for t in ("weight", "bias")]
    return pairs + [("decoder_bias", "cls.predictions.bias")] * head


def _convert_hf_state(s: dict, cfg: BertConfig) -> dict:
    """HF BERT weights (names without "bert.") as ours; the MLM head only where the file has one."""
    out = {ours: s[hf] for ours, hf in _hf_names(cfg) if not hf.startswith("cls.") or "cls.predictions.bias" in s}
    for i in range(cfg.num_layers):
        att = f"encoder.layer.{i}.attention.self."
        for t in ("weight", "bias"):
            out[f"bert.layers.{i}.qkv.{t}"] = torch.cat([s[att + n + "." + t] for n in ("query", "key", "value")])
    return out


def _to_hf_state(s: dict, cfg: BertConfig, head: bool = True) -> dict:
    """The inverse of _convert_hf_state, with HF BertForMaskedLM's names (contiguous copies, as
    safetensors needs; the decoder weight is the word embedding, as HF ties it); head=False: the encoder only."""
    out = {(hf if hf.startswith("cls.") else "bert." + hf): s[ours] for ours, hf in _hf_names(cfg, head)}
    for i in range(cfg.num_layers):
        for t in ("weight", "bias"):
            for name, part in zip(("query", "key", "value"), s[f"bert.layers.{i}.qkv.{t}"].chunk(3)):
                out[f"bert.encoder.layer.{i}.attention.self.{name}.{t}"] = part
    if head:
        out["cls.predictions.decoder.weight"] = s["bert.word.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}



# ---------------------------------------------------------------- command line

def check_output(ckpt: Path, out: Path, command: str, overwrite: bool) -> None:
    """Nothing is overwritten without --overwrite, and then only this command's own kind of output."""
    if out.resolve() == ckpt.resolve() or ckpt.resolve() in out.resolve().parents:
        raise CheckpointError(f"{out} is (inside) the checkpoint being read: pass another output path")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise CheckpointError(f"{out} exists: pass another output path, or --overwrite to replace an earlier "
                              f"{'export' if command == 'export' else 'consolidated checkpoint'}")
    if command == "export" and not (out.is_dir() and {f.name for f in out.iterdir()} <= HF_FILES):
        raise CheckpointError(f"{out} is not an earlier export (only {', '.join(sorted(HF_FILES))}): --overwrite "
                              "replaces nothing else; pass a new directory")
    if command == "consolidate" and not (out.is_file() and is_checkpoint_file(out)):
        raise CheckpointError(f"{out} is not a one-file checkpoint: --overwrite replaces nothing else; pass a new path")


def is_checkpoint_file(path: Path) -> bool:
    """Whether path is a one-file checkpoint of this project (read lazily, mapped)."""
    try:
        return {"config", "model"} <= torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys()
    except Exception:                                   # noqa: BLE001 - anything unreadable is not one
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="checkpoint.py", description="Checkpoint files from the command line.")
    sub = p.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a dense checkpoint as a Hugging Face BERT directory")
    export.add_argument("ckpt", help="a .pt or sharded directory written by pretrain.py (or a Hugging Face BERT directory)")
    export.add_argument("out", help="a new directory: config.json, model.safetensors, vocab.txt")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export at out (nothing else)")
    consolidate = sub.add_parser("consolidate", help="write a sharded checkpoint directory as one .pt file")
    consolidate.add_argument("ckpt", help="a sharded checkpoint directory written by pretrain.py under torchrun")
    consolidate.add_argument("out", help="the one-file checkpoint to write (not the directory itself)")
    consolidate.add_argument("--overwrite", action="store_true", help="replace a checkpoint file at out (nothing else)")
    args = p.parse_args(argv)
    try:
        check_output(Path(args.ckpt), Path(args.out), args.command, args.overwrite)
        if args.command == "consolidate":
            atomic_save(read_checkpoint(args.ckpt), args.out)
            print(f"wrote {args.out}: one file, every expert (finetune.py and pretrain.py --resume take it)")
            return 0
        mlm, ckpt = load_checkpoint(args.ckpt)
        out = Path(args.out)
        fresh = out.with_name(f".{out.name}.export-{os.getpid()}.tmp") if out.exists() else out
        try:
            to_hf_bert(mlm, fresh, ckpt.get("vocab"))
            if fresh != out:                                  # --overwrite of an earlier export, swapped whole
                replace_path(fresh, out)
        finally:
            if fresh != out and fresh.exists():
                shutil.rmtree(fresh)
    except (InputFileError, FileNotFoundError) as e:
        print(f"checkpoint.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                                  # a full disk, a read-only place, a file-size limit
        print(f"checkpoint.py: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: transformers.BertForMaskedLM.from_pretrained({args.out!r}) loads it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
