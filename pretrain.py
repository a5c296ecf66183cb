"""Pretrain vanilla BERT, MoE BERT, or MoE BERT with transfer capability distillation (TCD).

    python pretrain.py                                     # teacher, Eq. 12: L = L_MLM     -> ckpt/vanilla.pt
    python pretrain.py --moe                               # baseline: L_MLM + λB·L_B        -> ckpt/moe.pt
    python pretrain.py --moe --teacher ckpt/vanilla.pt     # TCD, Eq. 13                     -> ckpt/moe_tcd.pt
    torchrun --nproc_per_node=4 pretrain.py --moe --teacher ckpt/vanilla.pt   # data + expert parallel

Defaults are the paper's (Appendix A): small preset, 64 experts, λB=1000, λT=λI=1, λA=0 (1 for
base), 4096 relation tokens in groups of 128, AdamW lr 1e-4, 10k warm-up steps, batch 512,
sequence length 128, 15% dynamic masking. Without --data it trains on data/sample.txt.

Batches and randomness. --batch-size is the global batch of one optimizer step. It is cut into
world_size x grad_accum micro-batches; rank r runs micro-batches r*A ... r*A+A-1. The MLM
masks, the dropout seed and the relation token sample of a micro-batch derive from
(seed, step, micro-batch index) only, so W ranks with A accumulation steps give the same
update as one process with W*A accumulation steps, and a resumed run replays an uninterrupted
one exactly. Each micro-batch's loss is the mean over its own masked tokens; the step's loss
is the mean over micro-batches. The balance loss (Eq. 4-5) is per micro-batch, over that
micro-batch's tokens on its rank, then averaged like the rest.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from distill import Teacher, sample_groups, tcd_losses
from model import (BertConfig, BertForMaskedLM, CheckpointError, adamw_warmup_linear, make_tokenizer, mask_tokens,
                   masked_log_likelihood, read_checkpoint, read_vocab, save_checkpoint, tune_allocator)
from moe import clip_gradients, gather_experts, optimizer_state, shard_experts, sync_gradients

HERE = Path(__file__).resolve().parent
VALID_SEED = 1234                      # fixed validation masks: every model is scored on the same ones


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- data

def read_documents(spec: str) -> list[str]:
    """Documents from a text file (blank-line separated), a .jsonl file (a `text` field per
    line), a directory of those, or hf:NAME[:CONFIG] (datasets.load_dataset, train split)."""
    if spec.startswith("hf:"):
        import datasets
        name, _, config = spec[3:].partition(":")
        return [t for t in datasets.load_dataset(name, config or None, split="train")["text"] if t.strip()]
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        return [doc for f in files for doc in read_documents(str(f))]
    if not path.is_file():
        raise UsageError(f"corpus {spec} not found: pass text/.jsonl files, directories, or hf:NAME")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise UsageError(f"{spec} line {n}: not a JSON object with a 'text' field") from None
        return docs
    return [d for d in text.split("\n\n") if d.strip()]


def segments(specs: list[str], vocab: list[str], seq_len: int, cache_dir: Path, log) -> np.ndarray:
    """The corpus as continuous [CLS] ... [SEP] segments, (S, seq_len) uint16, cached on disk
    by (data files with sizes and times, vocab, seq_len) so a second run does not re-tokenize."""
    key = hashlib.sha1(json.dumps([seq_len, vocab, [
        [s, *(lambda p: [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else [])(Path(s))]
        for s in specs]]).encode()).hexdigest()[:16]
    cache = cache_dir / f"tokens-{key}.npy"
    if cache.is_file():
        seg = np.load(cache, mmap_mode="r")
        log(f"token cache {cache}: {seg.size:,} tokens in {len(seg):,} segments")
        return seg
    docs = [d for s in specs for d in read_documents(s)]
    if not docs:
        raise UsageError(f"corpus {' '.join(specs)} holds no text: give files with documents in them")
    tok, ids = make_tokenizer(vocab), []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
    body = seq_len - 2
    n = len(ids) // body
    if n == 0:
        raise UsageError(f"corpus has {len(ids)} tokens, fewer than one segment of {seq_len}: add text")
    seg = np.empty((n, seq_len), dtype=np.uint16)
    seg[:, 0], seg[:, -1] = vocab.index("[CLS]"), vocab.index("[SEP]")
    seg[:, 1:-1] = np.asarray(ids[: n * body], dtype=np.uint16).reshape(n, body)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, seg)
    os.replace(tmp, cache)
    log(f"tokenized {len(docs):,} documents: {n * seq_len:,} tokens in {n:,} segments -> {cache}")
    return seg


def seeded(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha1(repr(parts).encode()).hexdigest()[:15], 16))


# ----------------------------------------------------------------------------- distributed

def setup_distributed(args):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = device if device.index is not None else torch.device("cuda", local)  # plain "cuda"
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(args.backend or ("nccl" if device.type == "cuda" else "gloo"))
    return rank, world, device


# ----------------------------------------------------------------------------- training

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


def train(args) -> int:
    rank, world, device = setup_distributed(args)
    log = (lambda msg: tqdm.write(msg)) if rank == 0 else (lambda msg: None)
    out = Path(args.out or f"ckpt/{'moe_tcd' if args.teacher else 'moe' if args.moe else 'vanilla'}.pt")
    resume = read_checkpoint(args.resume) if args.resume else None
    vocab = resume["vocab"] if resume else read_vocab(args.vocab)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out.resolve().parent.parent / "cache"
    specs = args.data or [str(HERE / "data" / "sample.txt")]
    if rank == 0:                                  # one rank tokenizes, the others read the cache
        train_seg = segments(specs, vocab, args.seq_len, cache_dir, log)
    if world > 1:
        dist.barrier()
        train_seg = segments(specs, vocab, args.seq_len, cache_dir, log) if rank else train_seg
    if args.valid:
        valid_seg = segments(args.valid, vocab, args.seq_len, cache_dir, log)
    else:                                          # hold out a fixed 1% slice at the end
        n_valid = max(1, min(len(train_seg) // 100, 2000))
        train_seg, valid_seg = train_seg[:-n_valid], train_seg[-n_valid:]
    steps_per_epoch = len(train_seg) // args.batch_size
    if steps_per_epoch == 0 or args.batch_size % (world * args.grad_accum):
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of world size x --grad-accum "
                         f"({world} x {args.grad_accum}) and at most the {len(train_seg)} training segments")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or sys.maxsize)
    warmup = min(args.warmup_steps, max(1, total_steps // 10))

    if resume:
        cfg = BertConfig.from_dict(resume["config"])
    else:
        cfg = BertConfig.preset(args.preset, vocab_size=len(vocab), num_experts=args.experts if args.moe else 0,
                                dropout=args.dropout, attention_dropout=args.dropout)
    torch.manual_seed(args.seed)
    group = dist.group.WORLD if world > 1 and cfg.moe else None
    model = BertForMaskedLM(cfg, expert_group=group).to(device)
    lambda_a = args.lambda_a if args.lambda_a is not None else (1.0 if args.preset == "base" else 0.0)
    teacher = None
    if args.teacher:
        teacher = Teacher.load(args.teacher, bf16=args.bf16).to(device)
        teacher.check_student(cfg, vocab, attention=lambda_a > 0)
    optimizer, scheduler = adamw_warmup_linear(model, args.lr, args.weight_decay, warmup, total_steps)
    start = 0
    if resume:
        model.load_state_dict(shard_experts(resume["model"], model))
        optimizer.load_state_dict(optimizer_state(optimizer, model, group is not None, resume["optimizer"]))
        scheduler.load_state_dict(resume["scheduler"])
        start = resume["step"]
        log(f"resumed {args.resume} at step {start}")
    n_params = sum(p.numel() for p in model.parameters()) * (world if group is not None else 1)
    log(f"{args.preset if not resume else 'resumed'} {'MoE x' + str(cfg.num_experts) if cfg.moe else 'vanilla'} "
        f"BERT, ~{n_params / 1e6:.1f}M parameters, {'TCD from ' + args.teacher if teacher else 'no teacher'}; "
        f"{len(train_seg):,} train / {len(valid_seg):,} valid segments, {total_steps} steps, warm-up {warmup}")

    special = torch.tensor([vocab.index(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")])
    mask_id = vocab.index("[MASK]")
    valid_in, valid_labels = mask_tokens(torch.from_numpy(valid_seg.astype(np.int64)), special, mask_id,
                                         len(vocab), seeded(VALID_SEED))
    metrics_file = out.with_suffix(".metrics.jsonl")
    micro = args.batch_size // (world * args.grad_accum)
    rel_tokens = max(args.relation_group, args.relation_tokens // (world * args.grad_accum))
    stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    metrics = {}

    def save(step: int, path: Path = out) -> None:
        state = gather_experts(model) if group is not None else model.state_dict()
        opt = optimizer_state(optimizer, model, group is not None)
        if rank == 0:
            save_checkpoint(path, model, model=state, vocab=vocab, step=step, epoch=step / steps_per_epoch,
                            metrics=metrics, optimizer=opt, scheduler=scheduler.state_dict(),
                            rng=torch.get_rng_state(), data_state={"seed": args.seed, "step": step,
                            "batch_size": args.batch_size, "segments": len(train_seg)}, args=vars(args))
        if world > 1:
            dist.barrier()

    def record(row: dict) -> None:
        if rank == 0:
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")

    bar = tqdm(total=total_steps, initial=start, disable=rank != 0, dynamic_ncols=True)
    model.train()
    t0, tokens_seen, perm_epoch, perm = time.time(), 0, -1, None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    for step in range(start, total_steps):
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = torch.randperm(len(train_seg), generator=seeded(args.seed, epoch)), epoch
        rows = perm[pos * args.batch_size:(pos + 1) * args.batch_size].sort().values.numpy()
        inputs, labels = mask_tokens(torch.from_numpy(train_seg[rows].astype(np.int64)), special, mask_id,
                                     len(vocab), seeded(args.seed, step))   # the whole global batch
        parts = torch.zeros(6)
        for m in range(rank * args.grad_accum, (rank + 1) * args.grad_accum):
            torch.manual_seed(int(seeded(args.seed, step, m, 1).initial_seed()))   # dropout
            x, y = inputs[m * micro:(m + 1) * micro].to(device), labels[m * micro:(m + 1) * micro].to(device)
            with autocast:
                res = model(x, labels=y, taps=teacher is not None)
                tcd = {"trunk": torch.zeros(()), "inner": torch.zeros(()), "attention": torch.zeros(())}
                if teacher is not None:
                    index = sample_groups(torch.ones_like(x, dtype=torch.bool), rel_tokens, args.relation_group,
                                          seeded(args.seed, step, m, 2))
                    tcd = tcd_losses(res.taps, teacher(x), index, None, attention=lambda_a > 0)
                loss = (res.loss + args.lambda_b * res.balance_loss + args.lambda_t * tcd["trunk"]   # Eq. 13
                        + args.lambda_i * tcd["inner"] + lambda_a * tcd["attention"])
            (loss / args.grad_accum).backward()
            parts += torch.stack([loss.detach().float().cpu(), res.loss.detach().float().cpu(),
                                  res.balance_loss.detach().float().cpu(),
                                  *(tcd[k].detach().float().cpu() for k in ("trunk", "inner", "attention"))]) / args.grad_accum
        if world > 1:
            sync_gradients(model, world)
            parts = parts.to(device)
            dist.all_reduce(parts)
            parts = parts.cpu() / world
        grad_norm = clip_gradients(model, args.clip, group is not None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += args.batch_size * args.seq_len
        bar.update(1)
        done = step + 1
        row = dict(zip(("loss", "mlm", "balance", "trunk", "inner", "attention"), parts.tolist()))
        row.update(step=done, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                   tokens_per_s=tokens_seen / (time.time() - t0))
        if cfg.moe:
            counts = torch.stack([layer.ffn.last_counts for layer in model.bert.layers])
            row.update(load_max=int(counts.max()), load_min=int(counts.min()))
        if done % args.log_every == 0 or done == total_steps:
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("mlm", "balance", "trunk", "inner", "attention", "lr")}
                            | {"tok/s": f"{row['tokens_per_s']:.0f}"})
            record(row)
        if done % args.eval_every == 0 or done % steps_per_epoch == 0 or done == total_steps:
            metrics = {"step": done, "epoch": done / steps_per_epoch,
                       "pretrain_perf": evaluate(model, valid_in, valid_labels, micro, args.bf16, rank, world)}
            record({"valid": True, **metrics})
            log(f"step {done} epoch {done / steps_per_epoch:.2f}: Pre-Train Perf. {metrics['pretrain_perf']:.5f}")
        if done % steps_per_epoch == 0 and done != total_steps:
            save(done)
        if done % steps_per_epoch == 0 and args.keep_epochs:
            save(done, out.with_name(f"{out.stem}.epoch{done // steps_per_epoch}.pt"))
        if world > 1:
            flag = torch.tensor([float(stop["now"])], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop["now"] = bool(flag)
        if stop["now"] or done == args.stop_at:
            save(done)
            log(f"stopped at step {done}; saved {out}: continue with --resume {out}")
            bar.close()
            return 130 if stop["now"] else 0
    bar.close()
    save(total_steps)
    log(f"done: {total_steps} steps, saved {out}")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", help="text/.jsonl files, directories, or hf:NAME[:CONFIG] (default data/sample.txt)")
    p.add_argument("--valid", nargs="+", help="held-out text (default: the last 1%% of the corpus' segments)")
    p.add_argument("--vocab", default=str(HERE / "data" / "bert-base-uncased-vocab.txt"))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    p.add_argument("--moe", action="store_true", help="replace every FFN by a top-1 Switch MoE layer")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--teacher", help="vanilla BERT checkpoint to distill transfer capability from (TCD)")
    p.add_argument("--lambda-b", type=float, default=1000.0, help="balance loss weight λB")
    p.add_argument("--lambda-t", type=float, default=1.0, help="trunk relation weight λT")
    p.add_argument("--lambda-i", type=float, default=1.0, help="residual-inner relation weight λI")
    p.add_argument("--lambda-a", type=float, default=None, help="attention relation weight λA (0 tiny/small, 1 base)")
    p.add_argument("--relation-tokens", type=int, default=4096, help="tokens sampled per batch for L_T, L_I")
    p.add_argument("--relation-group", type=int, default=128, help="tokens per relation group")
    p.add_argument("--batch-size", type=int, default=512, help="global batch (sequences per optimizer step)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--max-steps", type=int, default=0, help="cap on optimizer steps (0: epochs decide)")
    p.add_argument("--stop-at", type=int, default=0, help="save and stop after this step, schedule unchanged")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=10_000, help="capped at 10%% of the run")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU and CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="checkpoint path (default ckpt/vanilla.pt, ckpt/moe.pt or ckpt/moe_tcd.pt)")
    p.add_argument("--cache-dir", help="token cache (default: cache/ beside the checkpoint directory)")
    p.add_argument("--keep-epochs", action="store_true", help="also keep NAME.epochN.pt at each epoch end")
    p.add_argument("--resume", help="checkpoint to continue from (model, optimizer, schedule, data position)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--backend", help="torch.distributed backend (default nccl on CUDA, gloo on CPU)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tune_allocator()
    try:
        return train(args)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
