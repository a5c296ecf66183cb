"""Speed, measured as ratios against a reference run side by side in the same process.

    python bench.py                       # everything (about 10 minutes on 2 CPU cores)
    python bench.py --only moe hf         # some sections: moe, hf, step, throughput, memory, data
    python bench.py --device cuda         # the same on a GPU
    python bench.py --default-malloc      # without model.tune_allocator(), as a plain script runs

moe        SwitchFFN forward+backward (64 experts, H=128, F=512, default init) / a dense FFN of the
           same width on the same tokens, at 16,384 and 4,096 tokens; torch's grouped_mm for scale;
           expert-choice routing (c = 1, sequences of 128 as routing groups) / dense and / top-1.
hf         BertForMaskedLM train step (small preset, batch 32x128 or --batch, 15% masked, AdamW): tokens/s of
           model.py over transformers.BertForMaskedLM, fp32 and bf16 autocast.
step       train step time, same batch (small preset): MoE-64 / vanilla and MoE+TCD / MoE.
arms       train step time of the miniature's arms (tiny preset, 16 experts, batch 64x128, bf16, as
           results/run.sh trains them): expert choice / top-1 MoE, top-1 MoE + MoDE (--mode-tokens) / MoE.
throughput tokens/s and peak memory (CPU: RSS; GPU: allocated) of full training steps per preset,
           each in a fresh process.
memory     a tiny bf16 run at batch 64 with fresh masks and evaluations, as pretrain.py runs it:
           peak resident memory after 50 steps and at the end, with and without tune_allocator.
data       prepare.py on a text file (--data-text, default the shared train.txt, else data/sample.txt)
           / the tokenizers library's own encode_batch on the same documents already in memory: the
           ratio of their tokens/s (1.0: prepare adds nothing to tokenizing), and prepare's peak RSS
           in a fresh process with the bytes it wrote per token.
Timings interleave the two sides (A B A B ...) and report the fastest run of each: on a shared
machine, neighbours and page faults only ever add time (the same matmul here takes 88-155 ms from
one second to the next), so the minimum is the steadiest estimate of what the code costs.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill import Teacher, sample_groups, tcd_losses
from common import tune_allocator
from model import BertConfig, BertForMaskedLM, adamw_warmup_linear
from moe import SwitchFFN

DEFAULT_VOCAB = Path(__file__).resolve().parent / "data" / "bert-base-uncased-vocab.txt"


def race(fns: dict, repeats: int, device) -> dict[str, float]:
    """Fastest seconds per call of each function, calls interleaved round-robin."""
    times = {k: [] for k in fns}
    for _ in range(2):                                   # warm-up
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


def bench_moe(args, device) -> list[dict]:
    H, Fd, E = 128, 512, 64
    rows = []
    for tokens in (16384, 4096):
        torch.manual_seed(0)
        x = torch.randn(tokens, H, device=device, requires_grad=True)
        dense = nn.Sequential(nn.Linear(H, Fd), nn.GELU(), nn.Linear(Fd, H)).to(device)
        switch = SwitchFFN(H, Fd, E).to(device)
        choice = SwitchFFN(H, Fd, E, routing="expert_choice").to(device)
        choice.load_state_dict(switch.state_dict())
        groups = x.view(-1, 128, H)                          # (B, T, H): each sequence a routing group

        def run_dense():
            dense(x).sum().backward()

        def run_switch():
            y, balance = switch(x)
            (y.sum() + balance).backward()

        def run_choice():
            y, _ = choice(groups)
            y.sum().backward()

        def run_grouped():                               # the same layer through torch's grouped_mm
            probs = switch.router(x).float().softmax(-1)
            gate, expert = probs.max(-1)
            order = expert.argsort()
            offs = torch.bincount(expert, minlength=E).cumsum(0).to(torch.int32)
            xs = x[order]
            h = F.gelu(F.grouped_mm(xs, switch.w1, offs=offs) + switch.b1[expert[order]])
            y = F.grouped_mm(h, switch.w2, offs=offs) + switch.b2[expert[order]]
            out = torch.empty_like(y).index_copy(0, order, y) * gate[:, None]
            out.sum().backward()

        fns = {"dense": run_dense, "switch": run_switch, "expert_choice": run_choice}
        if hasattr(F, "grouped_mm") and device.type == "cpu":   # on GPUs it takes bf16 only
            fns["grouped_mm"] = run_grouped
        t = race(fns, args.repeats, device)
        counts = switch.last_counts
        rows.append({"tokens": tokens, "dense_ms": 1e3 * t["dense"], "switch_ms": 1e3 * t["switch"],
                     "switch/dense": t["switch"] / t["dense"],
                     "grouped_mm/dense": t.get("grouped_mm", float("nan")) / t["dense"],
                     "expert_choice/dense": t["expert_choice"] / t["dense"],
                     "expert_choice/switch": t["expert_choice"] / t["switch"],
                     "busiest/mean expert load": float(counts.max() / counts.float().mean())})
    return rows


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer pretrain.py uses (fused AdamW), for both sides of every comparison."""
    return adamw_warmup_linear(model, lr=1e-4, weight_decay=0.01, warmup=100, total=10**6)[0]


def mlm_batch(cfg, batch, seq, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, cfg.vocab_size, (batch, seq), generator=g)
    labels = torch.where(torch.rand(batch, seq, generator=g) < 0.15, ids, -100)
    return ids.to(device), labels.to(device)


def train_step(model, optimizer, ids, labels, bf16, device, extra=None):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if extra is None:
                res = model(ids, labels=labels)
                loss = res.loss if not hasattr(res, "balance_loss") else res.loss + 1000 * res.balance_loss
            else:
                loss = extra()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_hf(args, device) -> list[dict]:
    import transformers
    cfg = BertConfig.preset("small", dropout=0.1, attention_dropout=0.1)
    ids, labels = mlm_batch(cfg, args.batch, 128, device)
    ours = BertForMaskedLM(cfg).to(device)
    hf_cfg = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                                     intermediate_size=cfg.intermediate_size)
    hf = transformers.BertForMaskedLM(hf_cfg).to(device).train()
    rows = []
    for bf16 in (False, True):
        fns = {"ours": train_step(ours, adamw(ours), ids, labels, bf16, device),
               "hf": train_step(hf, adamw(hf), ids, labels, bf16, device)}
        t = race(fns, args.repeats, device)
        tokens = ids.numel()
        rows.append({"bf16": bf16, "ours_tok_s": tokens / t["ours"], "hf_tok_s": tokens / t["hf"],
                     "ours/hf tokens/s": t["hf"] / t["ours"]})
    return rows


def bench_step(args, device) -> list[dict]:
    rows = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        cfg = BertConfig.preset("small")
        ids, labels = mlm_batch(cfg, args.batch, 128, device)
        vanilla = BertForMaskedLM(cfg).to(device)
        moe = BertForMaskedLM(BertConfig.preset("small", num_experts=64)).to(device)
        teacher = Teacher(BertForMaskedLM(cfg).bert, bf16=bf16).to(device)
        opt_v = adamw(vanilla)
        opt_m = adamw(moe)
        real = torch.ones_like(ids, dtype=torch.bool)
        g = torch.Generator().manual_seed(0)

        def tcd_loss():
            res = moe(ids, labels=labels, taps=True)
            index = sample_groups(real, 4096 * args.batch // 512, 128, g)  # the paper's 4096 per 512 sequences
            parts = tcd_losses(res.taps, teacher(ids), index, None, attention=False)
            return res.loss + 1000 * res.balance_loss + parts["trunk"] + parts["inner"]

        t = race({"vanilla": train_step(vanilla, opt_v, ids, labels, bf16, device),
                  "moe": train_step(moe, opt_m, ids, labels, bf16, device),
                  "moe_tcd": train_step(moe, opt_m, ids, labels, bf16, device, extra=tcd_loss)}, args.repeats, device)
        rows.append({"bf16": bf16, "vanilla_ms": 1e3 * t["vanilla"], "moe_ms": 1e3 * t["moe"],
                     "moe_tcd_ms": 1e3 * t["moe_tcd"], "moe/vanilla": t["moe"] / t["vanilla"],
                     "moe_tcd/moe": t["moe_tcd"] / t["moe"]})
    return rows


def bench_arms(args, device) -> list[dict]:
    from pretrain import mutual_distillation
    torch.manual_seed(0)
    top1 = BertConfig.preset("tiny", num_experts=16, dropout=0.0, attention_dropout=0.0)
    ids, labels = mlm_batch(top1, 64, 128, device)
    moe, choice = BertForMaskedLM(top1).to(device), BertForMaskedLM(replace(top1, routing="expert_choice")).to(device)
    opt_m, opt_c = adamw(moe), adamw(choice)
    g = torch.Generator().manual_seed(0)

    def mode_loss():
        res = moe(ids, labels=labels, taps=True)
        index = torch.randperm(ids.numel(), generator=g)[:args.mode_tokens].to(device)
        return res.loss + 250 * res.balance_loss + mutual_distillation(moe, res.taps, index)

    t = race({"moe": train_step(moe, opt_m, ids, labels, True, device),
              "expert_choice": train_step(choice, opt_c, ids, labels, True, device),
              "moe_mode": train_step(moe, opt_m, ids, labels, True, device, extra=mode_loss)}, args.repeats, device)
    return [{"mode_tokens": args.mode_tokens, "moe_ms": 1e3 * t["moe"], "expert_choice_ms": 1e3 * t["expert_choice"],
             "moe_mode_ms": 1e3 * t["moe_mode"], "expert_choice/moe": t["expert_choice"] / t["moe"],
             "moe_mode/moe": t["moe_mode"] / t["moe"]}]


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    from the parent through fork and exec, so a child would report the bench's own peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput_child(preset: str, experts: int, bf16: bool, device) -> dict:
    cfg = BertConfig.preset(preset, num_experts=experts)
    model = BertForMaskedLM(cfg).to(device)
    ids, labels = mlm_batch(cfg, 32, 128, device)
    t = race({"step": train_step(model, adamw(model), ids, labels, bf16, device)},
             8, device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {"preset": preset, "experts": experts, "bf16": bf16, "tokens_per_s": ids.numel() / t["step"],
            "peak_mb": peak}


def memory_child(steps: int, device) -> dict:
    """A tiny run as pretrain.py makes one (batch 64x128, bf16, a fresh 15% mask every step, so the
    masked count changes, and an evaluation every 50 steps): peak resident memory after 50 steps
    and at the end, and tokens/s. Before model.MASKED_ROWS_BUCKET this grew to 6 GB by step 100."""
    from model import masked_log_likelihood
    cfg = BertConfig.preset("tiny", dropout=0.0, attention_dropout=0.0)
    model = BertForMaskedLM(cfg).to(device)
    optimizer = adamw(model)
    g = torch.Generator().manual_seed(0)
    valid = torch.randint(1000, cfg.vocab_size, (256, 128), generator=g)
    valid_labels = torch.where(torch.rand(valid.shape, generator=g) < 0.15, valid, -100)
    early, t0 = 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        ids = torch.randint(1000, cfg.vocab_size, (64, 128), generator=g)
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100)
        train_step(model, optimizer, ids.to(device), labels.to(device), True, device)()
        if step % 50 == 0:
            model.eval()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                for b in range(0, len(valid), 64):
                    masked_log_likelihood(model, valid[b:b + 64].to(device), valid_labels[b:b + 64].to(device))
            model.train()
        if step == 50:
            early = peak_rss_mb()
    return {"steps": steps, "tokens_per_s": steps * 64 * 128 / (time.perf_counter() - t0),
            "peak_mb_at_50": early, "peak_mb_at_end": peak_rss_mb()}


def bench_memory(args, device) -> list[dict]:
    rows = []
    for malloc in ("tuned", "default"):
        out = subprocess.run([sys.executable, __file__, "--child", "memory", str(args.memory_steps), "0",
                              "--device", str(device)] + ["--default-malloc"] * (malloc == "default"),
                             capture_output=True, text=True, check=True)
        rows.append({"allocator": malloc, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def bench_throughput(args, device) -> list[dict]:
    rows = []
    for preset, experts in (("tiny", 0), ("tiny", 8), ("small", 0), ("small", 64)):
        for bf16 in (False, True):
            out = subprocess.run([sys.executable, __file__, "--child", preset, str(experts), str(int(bf16)),
                                  "--device", str(device)] + ["--default-malloc"] * args.default_malloc,
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def data_text(args) -> Path:
    if args.data_text:
        return Path(args.data_text)
    shared = Path(__file__).resolve().parent.parent / "shared" / "data" / "pretrain" / "train.txt"
    return shared if shared.is_file() else Path(__file__).resolve().parent / "data" / "sample.txt"


def prepare_child(text: str) -> dict:
    """One prepare of `text` in this fresh process: its peak RSS and what it wrote."""
    import tempfile
    from prepare import prepare
    from checkpoint import read_vocab
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        meta = prepare([text], None, read_vocab(DEFAULT_VOCAB), Path(d) / "corpus", log=lambda *_: None)
        seconds = time.perf_counter() - t0
        written = sum(f.stat().st_size for f in (Path(d) / "corpus").glob("*.bin"))
    tokens = meta["train_tokens"] + meta["valid_tokens"]
    return {"text_mb": Path(text).stat().st_size / 2**20, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "bytes_per_token": written / tokens, "peak_mb": peak_rss_mb()}


def bench_data(args, device) -> list[dict]:
    """prepare() against the tokenizers library's encode_batch on the same documents, in this process;
    prepare's memory in a child of its own (this process holds the documents for the reference)."""
    import tempfile
    from checkpoint import make_tokenizer, read_vocab
    from prepare import BATCH_BYTES, batches, documents, prepare
    text, vocab = data_text(args), read_vocab(DEFAULT_VOCAB)
    tok, docs = make_tokenizer(vocab), list(documents([str(text)]))
    chunks = list(batches(iter(docs), BATCH_BYTES))
    tokens = sum(len(e.ids) for c in chunks for e in tok.encode_batch(c, add_special_tokens=False))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "corpus"
        t = race({"encode_batch": lambda: [tok.encode_batch(c, add_special_tokens=False) for c in chunks],
                  "prepare": lambda: prepare([str(text)], None, vocab, out, log=lambda *_: None)},
                 args.data_repeats, device)
    child = subprocess.run([sys.executable, __file__, "--child", "data", str(text), "0"],
                           capture_output=True, text=True, check=True)
    rss = json.loads(child.stdout.strip().splitlines()[-1])
    return [{"text": text.name, "text_mb": rss["text_mb"], "tokens": tokens,
             "encode_batch_tok_per_s": tokens / t["encode_batch"], "prepare_tok_per_s": tokens / t["prepare"],
             "ratio": t["encode_batch"] / t["prepare"], "prepare_peak_mb": rss["peak_mb"],
             "bytes_per_token": rss["bytes_per_token"], "threads": torch.get_num_threads()}]


def table(rows: list[dict]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    heads = list(rows[0])
    return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
                     + ["| " + " | ".join(fmt(r[h]) for h in heads) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=["moe", "hf", "step", "arms", "throughput", "memory", "data"],
                   choices=["moe", "hf", "step", "arms", "throughput", "memory", "data"])
    p.add_argument("--mode-tokens", type=int, default=256, help="MoDE's sample per step in the arms section "
                   "(results/run.sh's)")
    p.add_argument("--data-text", help="the text file of the data section (default: shared train.txt)")
    p.add_argument("--data-repeats", type=int, default=3, help="timed runs of each side in the data section")
    p.add_argument("--memory-steps", type=int, default=300, help="steps of the memory section's tiny run")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="sequences of 128 tokens per step (hf, step)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--default-malloc", action="store_true",
                   help="skip model.tune_allocator(): glibc's defaults, as a plain HF script runs")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.default_malloc:
        tune_allocator()
    device = torch.device(args.device)
    if args.child and args.child[0] == "data":
        print(json.dumps(prepare_child(args.child[1])))
        return
    if args.child and args.child[0] == "memory":
        print(json.dumps(memory_child(int(args.child[1]), device)))
        return
    if args.child:
        print(json.dumps(throughput_child(args.child[0], int(args.child[1]), bool(int(args.child[2])), device)))
        return
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")
    results = {}
    for name in args.only:
        results[name] = {"moe": bench_moe, "hf": bench_hf, "step": bench_step, "arms": bench_arms,
                         "throughput": bench_throughput,
                         "memory": bench_memory, "data": bench_data}[name](args, device)
        print(f"\n## {name}\n{table(results[name])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
