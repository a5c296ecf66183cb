"""Pretrain vanilla BERT, MoE BERT, or MoE BERT with transfer capability distillation (TCD).

    python pretrain.py                                     # teacher, Eq. 12: L = L_MLM     -> ckpt/vanilla.pt
    python pretrain.py --moe                               # baseline: L_MLM + λB·L_B (no number in the paper) -> ckpt/moe.pt
    python pretrain.py --moe --teacher ckpt/vanilla.pt     # TCD, Eq. 13                     -> ckpt/moe_tcd.pt
    python pretrain.py --moe --routing expert_choice       # expert-choice MoE (Zhou et al., 2022), no L_B
    python pretrain.py --moe --mode-alpha 1                # + α·L_KD, our reading of MoDE (Xie et al., 2024)
    python pretrain.py --resume ckpt/moe_tcd.pt            # continue that run, with its own settings
    torchrun --nproc_per_node=4 pretrain.py --moe --teacher ckpt/vanilla.pt   # data + expert parallel

Defaults are the paper's (Appendix A): small preset, 64 experts, λB=1000, λT=λI=1, λA=0 (1 for
base), 4096 relation tokens in groups of 128, lr 1e-4, 10k warm-up steps, batch 512 (1024
for base), sequence length 128, 15% dynamic masking, a schedule sized for 40 epochs. Without
--data it trains on data/sample.txt; without --valid it holds out a fixed random 1% of the
documents. The paper trains with "Adam ... an L2 weight of 0.01"; we use AdamW (decoupled decay of
0.01, none on biases and LayerNorms): our choice. "Pre-Train Perf." is the mean log-likelihood of the original token at masked
positions of the held-out text, with masks fixed once (closer to 0 is better).

Resume. A checkpoint carries every setting of its run. `--resume [CKPT]` (default: the --out
checkpoint) continues that run with those settings; only flags that do not change the run may be
given again (--stop-at, --stop-epochs, --eval-every, --log-every, --keep-*, --out, --cache-dir,
--device, --backend, and the world size with --grad-accum). Ctrl-C and SIGTERM save and exit.
A checkpoint is one .pt file, or, with experts sharded over torchrun's ranks, a directory in which
each rank writes its own experts (checkpoint.py); a resume reads either onto any world size.

Batches and randomness. --batch-size is the global batch of one optimizer step. It is cut into
world_size x grad_accum micro-batches; rank r runs micro-batches r*A ... r*A+A-1. The MLM
masks, the dropout seed and the relation token sample of a micro-batch derive from
(seed, step, micro-batch index) only, so W ranks with A accumulation steps give the same
update as one process with W*A accumulation steps, and a resumed run replays an uninterrupted
one exactly. Each micro-batch's loss is the mean over its own masked tokens; the step's loss
is the mean over micro-batches. The balance loss (Eq. 4-5) is per micro-batch, over that
micro-batch's tokens on its rank, then averaged like the rest.

The file reads top to bottom: config (the command line and its checks), data, distributed set-up,
the objective (Eq. 12-13), one run's step, evaluation and checkpoint, building a run, the loop.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from distill import Teacher, sample_groups, tcd_losses
from checkpoint import (CheckpointError, is_checkpoint_file, read_checkpoint, read_checkpoint_args, read_vocab,
                        save_checkpoint, save_sharded)
from common import HelpFormatter, finite_float, tune_allocator, unwritable
from model import PRESETS, BertConfig, BertForMaskedLM, adamw_warmup_linear, mask_tokens, masked_log_likelihood
from prepare import Windows, find_or_prepare, is_prepared, open_corpus, seeded
from moe import clip_gradients, sync_gradients

HERE = Path(__file__).resolve().parent
VALID_SEED = 1234                      # fixed validation masks: every model is scored on the same ones
DROPOUT_STREAM, RELATION_STREAM, MODE_STREAM = 1, 2, 3  # seeded(seed, step, micro-batch, stream): one per use
VALID_SHARE = 0.01                     # documents held out when no --valid is given
PARTS = ("loss", "mlm", "balance", "trunk", "inner", "attention", "mode")
# The resume rules, stated once. A resume restores every setting from its checkpoint except THIS_COMMAND's,
# which belong to the command that resumes (what to stop at, where to write, on what hardware; the world size
# with --grad-accum). A flag given again must equal the run's, unless it is FREE_ON_RESUME: these, and
# cadences and the cache, do not change what is trained. The data's paths may change (a corpus copied to
# another disk): check_same_data compares the tokens themselves.
THIS_COMMAND = {"resume", "auto_resume", "out", "overwrite", "stop_at", "stop_epochs", "device", "backend", "grad_accum"}
FREE_ON_RESUME = THIS_COMMAND | {"eval_every", "log_every", "keep_epochs", "keep_every", "save_every", "cache_dir",
                                 "data", "valid"}


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


class AgreedError(UsageError):
    """A refusal every rank reached together (agreed): rank 0 has printed its one line already."""


# ----------------------------------------------------------------------------- config: the command line

def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain.py", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a("--data", nargs="+", help="a corpus prepared by prepare.py, or text/.jsonl files (.gz/.zst), directories, or "
      "hf:NAME[:CONFIG], prepared into the cache on first use (default: data/sample.txt)")
    a("--valid", nargs="+", help="held-out text for Pre-Train Perf. (default: a fixed random 1%% of the documents)")
    a("--vocab", default=str(HERE / "data" / "bert-base-uncased-vocab.txt"), help="WordPiece vocab.txt")
    a("--seq-len", type=int, default=128, help="tokens per segment, [CLS] and [SEP] included (paper: 128)")
    a("--preset", choices=["tiny", "small", "base"],
      help="model size: small H=128 x 12 layers (paper), base H=768 x 12, tiny H=128 x 4 (CPU demo) "
      "(default: the teacher's with --teacher, as in the paper; else small)")
    a("--moe", action="store_true", help="replace every FFN by a top-1 Switch MoE layer")
    a("--experts", type=int, default=64, help="experts per MoE layer (paper: 64)")
    add_remedy_flags(a)
    a("--teacher", help="vanilla BERT checkpoint to distill transfer capability from (TCD, Eq. 13)")
    a("--lambda-b", type=finite_float, default=1000.0, help="balance loss weight λB (paper: 1000) on L_B summed "
      "over the L MoE layers; the paper does not say sum or mean, and 1000 on the mean is --lambda-b 1000/L")
    a("--lambda-t", type=finite_float, default=1.0, help="trunk relation weight λT (paper: 1)")
    a("--lambda-i", type=finite_float, default=1.0, help="residual-inner relation weight λI (paper: 1)")
    a("--lambda-a", type=finite_float, help="attention relation weight λA (default: the paper's, 0 tiny/small, 1 base)")
    a("--relation-tokens", type=int, default=4096, help="tokens sampled per batch for L_T, L_I (paper: 4096)")
    a("--relation-group", type=int, default=128, help="tokens per relation group (paper: 128)")
    a("--batch-size", type=int, help="global batch in sequences per optimizer step (default: the paper's, "
      "512; 1024 for base)")
    a("--grad-accum", type=int, default=1, help="micro-batches per rank per step (same update, less memory)")
    a("--epochs", type=int, default=40, help="epochs the learning-rate schedule is sized for (paper: 40)")
    a("--max-steps", type=int, default=0, help="cap on the schedule's optimizer steps (0: --epochs decide)")
    a("--stop-at", type=int, default=0, help="save and stop after this step, schedule unchanged (0: never)")
    a("--stop-epochs", type=int, default=0, help="save and stop after this many epochs, schedule unchanged")
    a("--lr", type=finite_float, default=1e-4, help="peak learning rate (paper: 1e-4)")
    a("--weight-decay", type=finite_float, default=0.01, help="AdamW's decoupled weight decay (the paper: an L2 weight of 0.01 with Adam; AdamW is our choice)")
    a("--beta2", type=finite_float, default=0.999, help="Adam β2 (paper: 0.999)")
    a("--warmup-steps", type=int, default=10_000, help="linear warm-up steps, capped at 10%% of the schedule "
      "(paper: 10,000)")
    a("--clip", type=finite_float, default=1.0, help="gradient norm clip (0: off)")
    a("--dropout", type=finite_float, default=0.1, help="hidden and attention dropout (BERT's default; the paper does not state it)")
    a("--mask-prob", type=finite_float, default=0.15, help="share of tokens masked in training; validation "
      "always uses 0.15 (paper: 0.15)")
    a("--short-seq-len", type=int, default=0, help="curriculum: cut each segment into pieces of this length "
      "for the first --short-seq-steps steps (0: off; the paper trains at 128 throughout)")
    a("--short-seq-steps", type=int, default=0, help="steps of the short-sequence curriculum")
    a("--position-init", choices=["normal", "sinusoid"], default="normal",
      help="initial position embeddings: BERT's N(0, 0.02), or sinusoids of the same scale")
    a("--bf16", action="store_true", help="bfloat16 autocast (CPU and CUDA)")
    a("--seed", type=int, default=0, help="seed of the weights, batches, masks and dropout")
    add_checkpoint_flags(a)
    a("--log-every", type=int, default=10, help="steps between lines of NAME.metrics.jsonl")
    a("--eval-every", type=int, default=1000, help="steps between Pre-Train Perf. evaluations (also at epoch ends)")
    a("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    a("--backend", help="torch.distributed backend (default: nccl on CUDA, gloo on CPU)")
    return p


def add_remedy_flags(a) -> None:
    """The other remedies for MoE's weak fine-tuning, as options of the same MoE layer (moe.py)."""
    a("--routing", choices=["top1", "expert_choice"], default="top1", help="MoE routing: top1 (the paper's, "
      "Eq. 1-3) or expert_choice (Zhou et al., 2022: each expert takes its k best tokens of each sequence; no L_B)")
    a("--capacity-factor", type=finite_float, default=1.0, help="expert choice: k = round(c·n/E) tokens per "
      "expert of a sequence of n (1: top-1's expert FLOPs; 2: top-2's)")
    a("--mode-alpha", type=finite_float, default=0.0, help="α of our reading of MoDE (Xie et al., 2024): "
      "α·L_KD, the mean squared distance between every pair of experts' outputs on sampled tokens (0: off)")
    a("--mode-tokens", type=int, default=512, help="tokens per step sampled at each MoE layer for MoDE's L_KD "
      "(split over micro-batches, like --relation-tokens)")


def add_checkpoint_flags(a) -> None:
    """Where a run is saved, and how it stops, keeps and continues."""
    a("--out", help="checkpoint path (default: ckpt/vanilla.pt, ckpt/moe.pt or ckpt/moe_tcd.pt; "
      "with --resume, the checkpoint resumed)")
    a("--overwrite", action="store_true", help="start afresh over an existing --out checkpoint")
    a("--cache-dir", help="token cache (default: cache/ beside the checkpoint directory)")
    a("--keep-epochs", action="store_true", help="also keep NAME.epochN.pt at each epoch end")
    a("--keep-every", type=int, default=0, help="also keep NAME.stepN.pt every N steps (0: off)")
    a("--resume", nargs="?", const="", help="continue the run saved in this checkpoint (default: --out) "
      "with its own settings")
    a("--auto-resume", action="store_true", help="continue --out if a checkpoint is there, else start it: the "
      "same command after a crash, an elastic restart (torchrun --max-restarts) or a SLURM requeue goes on")
    a("--save-every", type=int, default=0, help="also save --out every N steps (0: at epoch ends only); what a "
      "restarted job loses at most")


def parse_args(argv=None) -> tuple[argparse.Namespace, set]:
    """(args with defaults, the names of the flags given on the command line)."""
    args = make_parser().parse_args(argv)
    unset = object()                 # argparse fills in a default only where the namespace has no value
    given = make_parser().parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in vars(args)}))
    return args, {k for k, v in vars(given).items() if v is not unset}


def fill_defaults(args) -> None:
    """Settings that depend on others, made explicit so a checkpoint records what ran."""
    args.data = [s if s.startswith("hf:") else str(Path(s).resolve()) for s in
                 (args.data or [str(HERE / "data" / "sample.txt")])]
    args.valid = [s if s.startswith("hf:") else str(Path(s).resolve()) for s in args.valid] if args.valid else None
    args.vocab = str(Path(args.vocab).resolve())
    args.cache_dir = str(Path(args.cache_dir).resolve()) if args.cache_dir else None
    args.teacher = str(Path(args.teacher).resolve()) if args.teacher else None
    if args.preset is None:                          # the paper's student has its teacher's shape
        args.preset = teacher_preset(args.teacher) if args.teacher and args.resume is None else "small"
    if args.batch_size is None:
        args.batch_size = 1024 if args.preset == "base" else 512
    if args.lambda_a is None:
        args.lambda_a = 1.0 if args.preset == "base" else 0.0
    default_out = f"ckpt/{'moe_tcd' if args.teacher else 'moe' if args.moe else 'vanilla'}.pt"
    args.out = str(Path(args.out or default_out).resolve())


def teacher_preset(path: str) -> str:
    """The preset a teacher checkpoint was trained with, or whose shape it has."""
    saved = read_checkpoint_args(path) or {}
    if saved.get("preset") in PRESETS:
        return saved["preset"]
    cfg = read_checkpoint(path)["config"]
    shape = ("hidden_size", "num_layers", "num_heads", "intermediate_size")
    for name, preset in PRESETS.items():
        if all(cfg.get(k) == preset[k] for k in shape):
            return name
    raise UsageError(f"the teacher {path} has no preset's shape (H={cfg.get('hidden_size')}, "
                     f"{cfg.get('num_layers')} layers): pass --preset")


def check_moe_options(args, explicit: set) -> None:
    """Routing, capacity and MoDE only where they mean something."""
    options = [n for n in ("routing", "capacity_factor", "mode_alpha", "mode_tokens") if n in explicit]
    if options and not args.moe:
        raise UsageError(f"--{options[0].replace('_', '-')} is a MoE setting: add --moe (and --experts)")
    if args.routing == "top1" and "capacity_factor" in explicit:
        raise UsageError("--capacity-factor sets expert choice's tokens per expert: add --routing expert_choice "
                         "(top-1 routing is dropless and has no capacity)")
    if args.routing == "expert_choice" and "lambda_b" in explicit and args.lambda_b:
        raise UsageError("expert choice has no balance loss (every expert takes k tokens): drop --lambda-b")
    if "mode_tokens" in explicit and not args.mode_alpha:
        raise UsageError("--mode-tokens sizes MoDE's sample: set --mode-alpha above 0 too")


def check_args(args, explicit: set = frozenset()) -> None:
    """One line per bad value, before any work."""
    positive = ["batch_size", "grad_accum", "epochs", "seq_len", "relation_tokens", "relation_group", "log_every",
                "eval_every", "lr", "capacity_factor", "mode_tokens"]
    non_negative = ["max_steps", "stop_at", "stop_epochs", "short_seq_steps", "warmup_steps", "weight_decay", "clip", "keep_every",
                    "save_every",
                    "lambda_b", "lambda_t", "lambda_i", "lambda_a", "mode_alpha"]
    for name in positive:
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive")
    for name in non_negative:
        if not getattr(args, name) >= 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be 0 or more")
    for name, lo, hi in (("dropout", 0.0, 1.0), ("beta2", 0.0, 1.0)):
        if not lo <= getattr(args, name) < hi:
            raise UsageError(f"--{name} {getattr(args, name)} must be in [{lo:g}, {hi:g})")
    if not 0 < args.mask_prob < 1:
        raise UsageError(f"--mask-prob {args.mask_prob} must be between 0 and 1")
    max_position = BertConfig.preset(args.preset).max_position
    if not 3 <= args.seq_len <= max_position:
        raise UsageError(f"--seq-len {args.seq_len} must be from 3 to {max_position}, the model's positions")
    if bool(args.short_seq_steps) != bool(args.short_seq_len):
        raise UsageError("the curriculum needs both --short-seq-len and --short-seq-steps (or neither)")
    if args.short_seq_steps and not (args.short_seq_len > 0 and args.seq_len % args.short_seq_len == 0):
        raise UsageError(f"--short-seq-len {args.short_seq_len} must divide --seq-len {args.seq_len}")
    if args.short_seq_steps and args.short_seq_len < 3:
        raise UsageError(f"--short-seq-len {args.short_seq_len} leaves no room for a token between [CLS] and [SEP]: "
                         "use 3 or more")
    if args.moe and args.experts < 2:
        raise UsageError(f"--moe needs --experts 2 or more (got {args.experts}); drop --moe for a vanilla model")
    check_moe_options(args, explicit)
    if args.relation_group > args.relation_tokens:
        raise UsageError(f"--relation-group {args.relation_group} is more than --relation-tokens "
                         f"{args.relation_tokens}")
    if args.batch_size % args.grad_accum:
        raise UsageError(f"--batch-size {args.batch_size} is not a multiple of --grad-accum {args.grad_accum}")


def auto_resume(args, explicit: set) -> None:
    """--auto-resume: resume --out when a checkpoint is there (a restarted job), else start it."""
    if args.resume is not None or "overwrite" in explicit:
        raise UsageError("--auto-resume decides by itself whether to resume --out: drop --resume and --overwrite")
    out = Path(args.out)
    if out.is_file() or (out / "common.pt").is_file():
        args.resume = ""


def settle_resume(args, explicit: set, world: int) -> None:
    """With --resume: the run's own settings from its checkpoint; a flag given again must agree
    with them, unless it is one that does not change the run (FREE_ON_RESUME)."""
    path = Path(args.resume or args.out)
    saved = read_checkpoint_args(path)
    if not saved or "micro_batches" not in saved:
        raise UsageError(f"{path} does not carry its run's settings (written by an older pretrain.py): "
                         "start a new run")
    defaults = vars(make_parser().parse_args([]))
    for name in explicit - FREE_ON_RESUME:
        if getattr(args, name) != saved.get(name, defaults.get(name)):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the run in {path} "
                             f"({saved.get(name)}): resume without it, or start a new run with another --out")
    for name, value in saved.items():                # cadences and paths too, unless given again
        if name in defaults and name not in THIS_COMMAND and name not in explicit:
            setattr(args, name, value)
    if "grad_accum" not in explicit:
        if saved["micro_batches"] % world:
            raise UsageError(f"the run in {path} has {saved['micro_batches']} micro-batches per step, not "
                             f"divisible over {world} ranks: pass --grad-accum")
        args.grad_accum = saved["micro_batches"] // world
    elif world * args.grad_accum != saved["micro_batches"]:
        raise UsageError(f"{world} ranks x --grad-accum {args.grad_accum} must make the run's "
                         f"{saved['micro_batches']} micro-batches per step")
    args.resume = str(path)
    if "out" not in explicit:
        args.out = str(path.resolve())


def check_out(args, explicit: set) -> None:
    """Fail before any work when --out cannot be written or would overwrite another run."""
    out = Path(args.out)
    if out.is_dir() and not (out / "common.pt").is_file():
        raise UsageError(f"{out} is a directory but not a checkpoint: pass a file path such as {out / 'moe.pt'}")
    if not args.resume and out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists: continue it with --resume {out}, start afresh with --overwrite, "
                         "or pass another --out")
    if args.overwrite and out.is_file() and not is_checkpoint_file(out):
        raise UsageError(f"{out} is not a checkpoint: --overwrite replaces only a run's checkpoint; pass another --out")
    if args.resume and out.exists() and out.resolve() != Path(args.resume).resolve() and not args.overwrite:
        raise UsageError(f"--out {out} exists and is not the run being resumed ({args.resume}): pass a new --out, "
                         "or --overwrite to replace it")
    cache = Path(args.cache_dir) if args.cache_dir else out.resolve().parent.parent / "cache"
    reason = unwritable(cache) if not is_prepared(args.data) else None
    if reason:
        raise UsageError(f"cannot write the token cache to {cache} ({reason}): pass another --cache-dir")
    reason = unwritable(out.parent)
    if reason:
        raise UsageError(f"cannot write checkpoints to {out.parent} ({reason}): pass another --out")


# ----------------------------------------------------------------------------- data

def load_corpus(args, vocab: list[str], cache_dir: Path, log, rank: int, world: int):
    """(train windows, held-out windows), memory-mapped from a prepared corpus (prepare.py): --data itself,
    or the one prepared from --data's text into the cache on first use. Rank 0 prepares; the others wait."""
    for spec in (args.data or []) + (args.valid or []):
        if is_prepared([spec]) and len(args.data) + len(args.valid or []) > 1:
            raise UsageError(f"{spec} is a prepared corpus: pass it alone as --data (it holds its own held-out "
                             "text); to train on more text, prepare it together with the rest (prepare.py --data ...)")
    if is_prepared(args.data):
        corpus = Path(args.data[0])
    else:
        find = lambda: find_or_prepare(args.data, args.valid, vocab, cache_dir, VALID_SHARE, args.seed, log)
        corpus = find() if rank == 0 else None
        if world > 1:
            dist.barrier()
            corpus = corpus or find()                   # rank 0's corpus: found, not prepared again
    return open_corpus(corpus, vocab, args.seq_len)


def shown(path) -> str:
    """A path as short as it can be said from here."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


# ----------------------------------------------------------------------------- distributed

def setup_distributed(args):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = device if device.index is not None else torch.device("cuda", local)  # plain "cuda"
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(args.backend or ("nccl" if device.type == "cuda" else "gloo"),
                                store=attempt_store(rank, world), rank=rank, world_size=world)
    return rank, world, device


def attempt_store(rank: int, world: int) -> dist.Store:
    """torch's env:// store, with the keys of this restart attempt apart: after an elastic restart
    (torchrun --max-restarts) the launcher's store still holds the attempt before's keys, and a rank
    that read a dead rank's address from them failed to connect."""
    from datetime import timedelta
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"          # torchrun hosts the store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent, timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


# ----------------------------------------------------------------------------- the objective

def objective(mlm: torch.Tensor, balance: torch.Tensor, tcd: dict, *, lambda_b: float, lambda_t: float,
              lambda_i: float, lambda_a: float, mode: torch.Tensor | None = None, mode_alpha: float = 0.0) -> torch.Tensor:
    """Eq. 13. A dense model has balance = 0; without a teacher tcd's parts are 0, which leaves Eq. 12
    for a dense model and L_MLM + λB·L_B (not numbered in the paper) for the MoE baseline. MoDE (our
    reading) adds α·L_KD; with α = 0 nothing is added, so the run is today's bit for bit."""
    loss = mlm + lambda_b * balance + lambda_t * tcd["trunk"] + lambda_i * tcd["inner"] + lambda_a * tcd["attention"]
    return loss + mode_alpha * mode if mode_alpha else loss


def lambdas(args) -> dict[str, float]:
    return {k: getattr(args, k) for k in ("lambda_b", "lambda_t", "lambda_i", "lambda_a", "mode_alpha")}


def mutual_distillation(model: BertForMaskedLM, taps: dict, index: torch.Tensor) -> torch.Tensor:
    """MoDE's L_KD (our reading, moe.py) averaged over the MoE layers, on the sampled tokens (flat
    positions `index`) of each layer's FFN input (taps["trunk"][2l], the attention block's LayerNorm)."""
    losses = []
    for layer, ffn_input in zip(model.bert.layers, taps["trunk"][0::2]):
        tokens = ffn_input.reshape(-1, ffn_input.shape[-1])[index]       # (T, H)
        losses.append(layer.ffn.mutual_distillation_loss(tokens))
    return torch.stack(losses).mean()


def micro_batch_losses(run: Run, x: torch.Tensor, y: torch.Tensor, step: int, m: int) -> dict:
    """Every part of Eq. 13 on one micro-batch (scalars, with gradients)."""
    mode_on = run.args.mode_alpha > 0
    res = run.model(x, labels=y, taps=run.teacher is not None or mode_on)
    zero = res.loss.new_zeros((), dtype=torch.float32)
    tcd = {"trunk": zero, "inner": zero, "attention": zero}
    if run.teacher is not None:
        index = sample_groups(torch.ones_like(x, dtype=torch.bool), run.relation_tokens, run.args.relation_group,
                              seeded(run.args.seed, step, m, RELATION_STREAM))   # the same tokens for both models
        tcd = tcd_losses(res.taps, run.teacher(x), index, None, attention=run.args.lambda_a > 0)
    mode = zero
    if mode_on:
        index = torch.randperm(x.numel(), generator=seeded(run.args.seed, step, m, MODE_STREAM))[:run.mode_tokens]
        mode = mutual_distillation(run.model, res.taps, index.to(x.device))
    parts = {"mlm": res.loss, "balance": res.balance_loss, **tcd, "mode": mode}   # mlm: L_MLM, Eq. 12
    return {"loss": objective(res.loss, res.balance_loss, tcd, mode=mode, **lambdas(run.args)), **parts}


# ----------------------------------------------------------------------------- one run

@dataclass
class Run:
    """Everything a training step, an evaluation and a checkpoint need."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    out: Path
    vocab: list
    train_seg: Windows
    model: BertForMaskedLM
    optimizer: torch.optim.Optimizer
    scheduler: object
    expert_parallel: bool             # experts sharded over the ranks (the group itself stays torch's)
    teacher: Teacher | None
    steps_per_epoch: int
    total_steps: int
    relation_tokens: int
    mode_tokens: int = 0              # MoDE's sample per micro-batch
    metrics: dict = field(default_factory=dict)
    stop: dict = field(default_factory=lambda: {"signal": 0})
    teacher_sha1: str | None = None   # a resume checks it: the same file name may now hold another model

    @property
    def micro(self) -> int:
        return self.args.batch_size // (self.world * self.args.grad_accum)

    def log(self, msg: str) -> None:
        if self.rank == 0:
            tqdm.write(msg)


@functools.lru_cache(maxsize=1)
def epoch_order(n_segments: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of the segments (drawn once per epoch, not once per step)."""
    return torch.randperm(n_segments, generator=seeded(seed, epoch))


def global_batch(run: Run, step: int, special, mask_id: int):
    """The step's whole global batch, masked: a fresh permutation each epoch, fresh masks each step.
    Reads only run.train_seg, run.steps_per_epoch, run.vocab and run.args (results/hf_curve.py too)."""
    epoch, pos = divmod(step, run.steps_per_epoch)
    order = epoch_order(len(run.train_seg), run.args.seed, epoch)
    rows = order[pos * run.args.batch_size:(pos + 1) * run.args.batch_size].sort().values.numpy()
    ids = torch.from_numpy(run.train_seg[rows].astype(np.int64))
    inputs, labels = mask_tokens(ids, special, mask_id, len(run.vocab), seeded(run.args.seed, step), run.args.mask_prob)
    if step < run.args.short_seq_steps:          # curriculum: the same tokens cut into shorter sequences
        inputs, labels = inputs.reshape(-1, run.args.short_seq_len), labels.reshape(-1, run.args.short_seq_len)
    return inputs, labels


def train_step(run: Run, inputs, labels, step: int) -> dict:
    """Forward, backward and update over this rank's micro-batches; returns the step's parts."""
    args, micro = run.args, inputs.shape[0] // (run.world * run.args.grad_accum)
    parts = torch.zeros(len(PARTS))
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=args.bf16)
    for m in range(run.rank * args.grad_accum, (run.rank + 1) * args.grad_accum):
        torch.manual_seed(int(seeded(args.seed, step, m, DROPOUT_STREAM).initial_seed()))
        x = inputs[m * micro:(m + 1) * micro].to(run.device)
        y = labels[m * micro:(m + 1) * micro].to(run.device)
        with autocast:
            losses = micro_batch_losses(run, x, y, step, m)
        (losses["loss"] / args.grad_accum).backward()
        parts += torch.stack([losses[k].detach().float().cpu() for k in PARTS]) / args.grad_accum
    if run.world > 1:
        sync_gradients(run.model, run.world)
        parts = parts.to(run.device)
        dist.all_reduce(parts)
        parts = parts.cpu() / run.world
    grad_norm = clip_gradients(run.model, args.clip, run.expert_parallel)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {**dict(zip(PARTS, parts.tolist())), "grad_norm": grad_norm}


def evaluate(model, inputs, labels, batch_size, bf16, rank, world) -> float:
    """Mean log-likelihood of the original token at masked positions ("Pre-Train Perf.")."""
    model.eval()
    n_batches = math.ceil(len(inputs) / batch_size)
    mine = list(range(rank, n_batches, world))
    rounds = math.ceil(n_batches / world)          # expert-parallel ranks must step in lockstep
    total = torch.zeros(2, dtype=torch.float64)
    device = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for r in range(rounds):
            b = mine[r] if r < len(mine) else 0
            sl = slice(b * batch_size, (b + 1) * batch_size)
            ll, count = masked_log_likelihood(model, inputs[sl].to(device), labels[sl].to(device))
            if r < len(mine):
                total += torch.tensor([ll, count], dtype=torch.float64)
    if world > 1:
        total = total.to(device)
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1].clamp_min(1))


def save(run: Run, step: int, path: Path | None = None) -> None:
    """A checkpoint that carries everything needed to continue the run (collective): one file, or
    with experts sharded over the ranks a directory in which each rank writes its own experts."""
    saved_args = {**vars(run.args), "micro_batches": run.world * run.args.grad_accum}
    extra = dict(vocab=run.vocab, step=step, teacher_sha1=run.teacher_sha1, epoch=step / run.steps_per_epoch, metrics=run.metrics,
                 scheduler=run.scheduler.state_dict(), rng=torch.get_rng_state(), args=saved_args,
                 data_state={"seed": run.args.seed, "step": step, "batch_size": run.args.batch_size,
                             "segments": len(run.train_seg), "corpus": run.train_seg.fingerprint})
    if run.expert_parallel:
        save_sharded(path or run.out, run.model, run.optimizer, run.rank, run.world, **extra)
    elif run.rank == 0:
        save_checkpoint(path or run.out, run.model, optimizer=run.optimizer.state_dict(), **extra)
    if run.world > 1:
        dist.barrier()


def launcher(world: int) -> str:
    """The command that started this process, so a resume hint keeps its ranks."""
    if world == 1:
        return "python pretrain.py"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = f" --nnodes={world // local}" if world > local else ""
    return f"torchrun{nodes} --nproc_per_node={local} pretrain.py"


def record(run: Run, row: dict) -> None:
    if run.rank == 0:
        with run.out.with_suffix(".metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


def start_metrics(out: Path, start: int) -> None:
    """A fresh run starts an empty metrics file; a resumed one keeps the rows up to its step
    (rows a crash left after the last checkpoint would be replayed)."""
    path = out.with_suffix(".metrics.jsonl")
    rows = path.read_text().splitlines() if start and path.is_file() else []
    kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= start]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(r + "\n" for r in kept))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- set-up

def build(args, rank: int, world: int, device) -> tuple[Run, int, np.ndarray]:
    """The run (model, teacher, optimizer, data), restored from --resume if given: (run, start, valid)."""
    out = Path(args.out)
    resume = agreed(lambda: read_checkpoint(args.resume, shard=(rank, world)), rank, world) if args.resume else None
    vocab = resume["vocab"] if resume else read_vocab(args.vocab)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out.resolve().parent.parent / "cache"
    train_seg, valid_seg = load_corpus(args, vocab, cache_dir, lambda m: tqdm.write(m) if rank == 0 else None,
                                       rank, world)
    steps_per_epoch = len(train_seg) // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size} is more than the {len(train_seg)} training segments: "
                         "use a smaller batch or more text")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or sys.maxsize)
    warmup = min(args.warmup_steps, max(1, total_steps // 10))
    cfg = (BertConfig.from_dict(resume["config"]) if resume else
           BertConfig.preset(args.preset, vocab_size=len(vocab), num_experts=args.experts if args.moe else 0,
                             dropout=args.dropout, attention_dropout=args.dropout, routing=args.routing,
                             capacity_factor=args.capacity_factor))
    torch.manual_seed(args.seed)
    group = dist.group.WORLD if world > 1 and cfg.moe else None
    model = BertForMaskedLM(cfg, expert_group=group).to(device)
    if args.position_init == "sinusoid" and not resume:
        sinusoid_positions_(model.bert.position.weight)
    teacher = None
    if args.teacher:
        teacher = Teacher.load(args.teacher, bf16=args.bf16).to(device)
        teacher.check_student(cfg, vocab, attention=args.lambda_a > 0)
    optimizer, scheduler = adamw_warmup_linear(model, args.lr, args.weight_decay, warmup, total_steps,
                                               betas=(0.9, args.beta2))
    relation_tokens = max(args.relation_group, args.relation_tokens // (world * args.grad_accum))
    run = Run(args, rank, world, device, out, vocab, train_seg, model, optimizer, scheduler, group is not None, teacher,
              steps_per_epoch, total_steps, relation_tokens, max(1, args.mode_tokens // (world * args.grad_accum)))
    if teacher is not None and args.relation_group > run.micro * args.seq_len:
        raise UsageError(f"--relation-group {args.relation_group} is more than the {run.micro * args.seq_len} "
                         "tokens of a micro-batch: lower it or raise --batch-size")
    if teacher is not None:
        run.teacher_sha1 = weights_sha1(teacher)
        if resume and resume.get("teacher_sha1") not in (None, run.teacher_sha1):
            raise UsageError(f"the teacher {args.teacher} now holds other weights than the run in {args.resume} "
                             "started with: put its teacher back, or start a new run")
    start = 0
    if resume:
        check_same_data(resume, train_seg, args.resume)
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start, run.metrics = resume["step"], resume.get("metrics") or {}
    run.log(f"{args.preset} {'MoE x' + str(cfg.num_experts) if cfg.moe else 'vanilla'} BERT, "
            f"~{parameter_count(model, world if group is not None else 1) / 1e6:.1f}M "
            f"parameters, {'TCD from ' + args.teacher if teacher else 'no teacher'}; {len(train_seg):,} train / "
            f"{len(valid_seg):,} valid segments, {total_steps} steps, warm-up {warmup}"
            + (f"; resumed {args.resume} at step {start}" if resume else ""))
    return run, start, valid_seg


def check_same_data(resume: dict, train_seg: Windows, path: str) -> None:
    """A resume trains on the data its run began with, or not at all (no silent change of data)."""
    saved = resume.get("data_state") or {}
    now = {"segments": len(train_seg), "corpus": train_seg.fingerprint}
    changed = [k for k in now if saved.get(k) is not None and saved[k] != now[k]]
    if changed:
        raise UsageError(f"the training data changed since the run in {path} began ({', '.join(changed)}: "
                         f"{saved[changed[0]]} then, {now[changed[0]]} now): resume with the data it started with, "
                         "or start a new run with another --out")


def agreed(read, rank: int, world: int):
    """read() on every rank, then a decision together: if any rank refused (a missing, foreign or torn rank
    file is one rank's to see), every rank stops with that one line, printed once, and no rank goes on."""
    try:
        value, error = read(), None
    except (CheckpointError, UsageError, FileNotFoundError, ValueError) as e:
        value, error = None, str(e)
    if world == 1:
        if error:
            raise UsageError(error)
        return value
    errors = [None] * world
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        if rank == 0:
            print(f"pretrain.py: error: {first}", file=sys.stderr, flush=True)
        dist.barrier()                                      # printed before any rank exits
        raise AgreedError(first)
    return value


def weights_sha1(module: nn.Module) -> str:
    """A fingerprint of a module's weights (names, shapes and values)."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def parameter_count(model: nn.Module, expert_ranks: int) -> int:
    """The whole model's parameters, wherever they live: dense ones once, every rank's experts."""
    return sum(p.numel() * (expert_ranks if getattr(p, "expert", False) else 1) for p in model.parameters())


@torch.no_grad()
def sinusoid_positions_(weight: torch.Tensor, std: float = 0.02) -> None:
    """Learned position embeddings started as Vaswani et al.'s sinusoids, scaled to BERT's init std:
    neighbouring positions start similar, so one query/key map can attend "one to the left" at every
    position at once, instead of each of the 128 positions learning it from noise."""
    T, H = weight.shape
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, H, 2, dtype=torch.float32) / H)
    table = torch.zeros(T, H)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    weight.copy_(table * std * math.sqrt(2))                   # root-mean-square = std (sin² + cos² = 1)


def on_signal(run: Run):
    def handler(signum, frame):
        run.stop["signal"] = signum
    return handler


# ----------------------------------------------------------------------------- the loop

def log_step(run: Run, bar, row: dict, done: int, tokens_per_s: float) -> None:
    row.update(step=done, tokens=done * run.args.batch_size * run.args.seq_len, lr=run.scheduler.get_last_lr()[0],
               tokens_per_s=tokens_per_s)
    if not run.args.mode_alpha:
        row.pop("mode", None)                                   # a run without MoDE logs what it logged before
    # every step on the bar (the first loss on screen after one step), every --log-every steps in the file
    bar.set_postfix({k: f"{row[k]:.3g}" for k in (*shown_parts(run), "lr")} | {"tok/s": f"{tokens_per_s:.0f}"})
    if done % run.args.log_every == 0 or done == run.total_steps:
        if run.model.config.moe:                                # read from the device only for a logged row
            row.update(routing_stats(run.model))
        record(run, row)


def shown_parts(run: Run) -> tuple[str, ...]:
    """The loss parts on the bar: none that is always 0 for this run."""
    parts = ["mlm"]
    if run.model.config.moe and run.model.config.routing != "expert_choice":
        parts.append("balance")
    if run.teacher:
        parts += ["trunk", "inner", "attention"]
    if run.args.mode_alpha:
        parts.append("mode")
    return tuple(parts)


def routing_stats(model: BertForMaskedLM) -> dict:
    """The last micro-batch's routing, per layer. Top-1: the busiest expert's load over the mean load
    (1 = balanced). Expert choice: the share of real tokens no expert took, and experts per chosen token."""
    ffns = [layer.ffn for layer in model.bert.layers]
    counts = torch.stack([f.last_counts for f in ffns]).float()
    row = {"load_max": int(counts.max()), "load_min": int(counts.min())}
    if model.config.routing == "expert_choice":
        choosers = [f.last_choosers.float() for f in ffns]
        row["layer_unchosen"] = [round(float((c == 0).float().mean()), 4) for c in choosers]
        row["layer_experts_per_token"] = [round(float(c[c > 0].mean()), 4) if (c > 0).any() else 0.0
                                          for c in choosers]
    else:
        row["layer_load_max"] = [round(float(c.max() / c.mean().clamp_min(1e-9)), 4) for c in counts]
    return row


def validate(run: Run, valid: tuple, done: int) -> None:
    """Pre-Train Perf. now; kept in run.metrics, so every checkpoint saved after it carries it."""
    perf = evaluate(run.model, *valid, min(run.micro, 64), run.args.bf16, run.rank, run.world)
    run.metrics = {"step": done, "epoch": done / run.steps_per_epoch,
                   "tokens": done * run.args.batch_size * run.args.seq_len, "pretrain_perf": perf}
    record(run, {"valid": True, **run.metrics})
    run.log(f"step {done} epoch {done / run.steps_per_epoch:.2f}: Pre-Train Perf. {perf:.5f}")


def train(args) -> int:
    rank, world, device = setup_distributed(args)
    run, start, valid_seg = build(args, rank, world, device)
    special = torch.tensor([run.vocab.index(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")])
    mask_id = run.vocab.index("[MASK]")
    valid = mask_tokens(torch.from_numpy(valid_seg.all()), special, mask_id, len(run.vocab),
                        seeded(VALID_SEED))                        # fixed masks, always 15%
    stop_at = min(args.stop_at or sys.maxsize, (args.stop_epochs or sys.maxsize) * run.steps_per_epoch)
    if start >= min(stop_at, run.total_steps):
        run.log(f"{shown(run.out)} is already at step {start}: nothing to do")
        return 0
    if rank == 0:
        start_metrics(run.out, start)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal(run))
    run.log("Pre-Train Perf.: mean log-likelihood of the original token at masked positions of the held-out "
            "text (closer to 0 is better)")
    bar = tqdm(total=run.total_steps, initial=start, disable=rank != 0, dynamic_ncols=True)
    t0 = time.time()
    run.model.train()
    for step in range(start, run.total_steps):
        # forward backward update
        inputs, labels = global_batch(run, step, special, mask_id)
        row = train_step(run, inputs, labels, step)
        done = step + 1
        bar.update(1)
        log_step(run, bar, row, done, (done - start) * args.batch_size * args.seq_len / (time.time() - t0))
        # evaluate
        epoch_end = done % run.steps_per_epoch == 0
        keep_step = bool(args.keep_every) and done % args.keep_every == 0
        if done % args.eval_every == 0 or epoch_end or keep_step or done == run.total_steps:
            validate(run, valid, done)
        # checkpoint
        if epoch_end and args.keep_epochs:
            save(run, done, run.out.with_name(f"{run.out.stem}.epoch{done // run.steps_per_epoch}.pt"))
        if keep_step:
            save(run, done, run.out.with_name(f"{run.out.stem}.step{done}.pt"))
        periodic = bool(args.save_every) and done % args.save_every == 0
        if (epoch_end or periodic) and done not in (run.total_steps, stop_at):
            save(run, done)
        # termination
        if world > 1:
            flag = torch.tensor([float(run.stop["signal"])], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            run.stop["signal"] = int(flag)
        if run.stop["signal"] or done == stop_at:
            save(run, done)
            run.log(f"stopped at step {done}; saved {shown(run.out)}: continue with "
                    f"{launcher(world)} --resume {shown(run.out)}")
            bar.close()
            return 128 + run.stop["signal"] if run.stop["signal"] else 0
    bar.close()
    save(run, run.total_steps)
    run.log(f"done: {run.total_steps} steps, saved {shown(run.out)}")
    return 0


def main(argv=None) -> int:
    tune_allocator()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)           # past a file-size limit: an error to report, not a kill
    try:
        args, explicit = parse_args(argv)
        fill_defaults(args)
        if args.auto_resume:
            auto_resume(args, explicit)
        if args.resume is not None:
            settle_resume(args, explicit, int(os.environ.get("WORLD_SIZE", 1)))
        check_args(args, explicit)
        if int(os.environ.get("RANK", 0)) == 0:
            check_out(args, explicit)
        return train(args)
    except AgreedError:
        return 2                                            # said once, by rank 0, as every rank stopped
    except (UsageError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                                    # a full disk, a file-size limit, a vanished directory
        print(f"pretrain.py: error: cannot write or read {e.filename or 'a file'} ({e.strerror or e}): free disk "
              "space or raise the file-size limit (ulimit -f), then resume; a checkpoint is written whole or not at "
              "all, so the last one saved is intact", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pretrain.py: interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # torch's own race: a gloo thread still freeing a collective's tensor needs the GIL, which aborts the
        # process during interpreter finalization; everything is saved and torn down, so leave without it
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
