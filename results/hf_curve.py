"""Side-by-side pretraining curves of our BertForMaskedLM and Hugging Face's from the same weights.

The same batches and masks, the same AdamW and schedule: the check that the masked-LM plateau was
the recipe's, not a model bug.

    python results/hf_curve.py --steps 3000 --out results/hf_curve.jsonl --state ../runs/hf_curve.pt

Both start from one HF initialisation (position embeddings set to sinusoids, as in the recipe) copied
into ours through model.from_hf_bert. Each step feeds the identical masked batch to both; every
--eval-every steps both are scored on the same validation segments and masks (Pre-Train Perf.).
Float rounding makes the two runs drift apart after some steps, so the curves, not the weights,
are what should agree. Resumable: both models and optimizers are saved to --state at every eval.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from checkpoint import from_hf_bert, read_vocab  # noqa: E402
from common import HelpFormatter, finite_float  # noqa: E402
from model import adamw_warmup_linear, mask_tokens  # noqa: E402
from prepare import find_or_prepare, open_corpus, seeded  # noqa: E402
from pretrain import VALID_SEED, VALID_SHARE, evaluate, global_batch, sinusoid_positions_  # noqa: E402


def hf_twin(vocab_size: int, seed: int, directory: Path) -> transformers.BertForMaskedLM:
    """The tiny preset as an HF model (dropout off), saved to `directory` for from_hf_bert."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=512, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
    hf = transformers.BertForMaskedLM(cfg)
    sinusoid_positions_(hf.bert.embeddings.position_embeddings.weight)
    hf.save_pretrained(directory)
    return hf.train()


class MaskedRowsHF(torch.nn.Module):
    """HF's encoder and HF's MLM head, the head applied to the masked rows only (as ours does):
    the same loss as BertForMaskedLM's, without 30k-way logits for the 85% of tokens never scored,
    which made HF's step 5x slower than ours here. Called like ours: (input_ids, mask, labels=)."""
    def __init__(self, hf: transformers.BertForMaskedLM):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = self.hf.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        scored = labels != -100
        logits = self.hf.cls(hidden[scored])                           # (masked tokens, V)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[scored])
        return type("Out", (), {"logits": logits, "loss": loss})()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hf_curve.py", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a("--data", default=str(HERE.parent.parent / "shared/data/pretrain/train.txt"), help="training text")
    a("--valid", default=str(HERE.parent.parent / "shared/data/pretrain/valid.txt"),
      help="held-out text scored for Pre-Train Perf.")
    a("--vocab", default=str(HERE.parent / "data" / "bert-base-uncased-vocab.txt"), help="WordPiece vocab.txt")
    a("--steps", type=int, default=3000, help="optimizer steps of each model (also the schedule's length)")
    a("--batch-size", type=int, default=32, help="sequences of 128 tokens per step, the same for both models")
    a("--lr", type=finite_float, default=1e-3, help="peak learning rate of both AdamW optimizers")
    a("--warmup", type=int, default=300, help="linear warm-up steps, then linear decay to 0 at --steps")
    a("--beta2", type=finite_float, default=0.98, help="Adam β2 of both optimizers")
    a("--mask-prob", type=finite_float, default=0.15, help="share of tokens masked in training (80/10/10)")
    a("--short-seq-len", type=int, default=32, help="curriculum: pieces of this length for the first steps")
    a("--short-seq-steps", type=int, default=750, help="steps of the short-sequence curriculum (0: off)")
    a("--eval-every", type=int, default=250, help="steps between evaluations of both models")
    a("--valid-segments", type=int, default=1024, help="validation segments scored (fixed masks)")
    a("--stop-at", type=int, default=0, help="stop after this step's evaluation (0: at --steps)")
    a("--seed", type=int, default=1, help="seed of the initialisation, batches and masks")
    a("--out", default=str(HERE / "hf_curve.jsonl"), help="the curve: one JSON line per evaluation")
    a("--state", default=str(HERE.parent.parent / "runs" / "hf_curve.pt"),
      help="both models and optimizers, saved at every evaluation to resume from")
    a("--cache-dir", default=str(HERE.parent.parent / "runs" / "cache"), help="token cache of pretrain.py")
    return p.parse_args(argv)


def build_pair(args, vocab_size: int, state: Path) -> tuple:
    """((name, model, optimizer, schedule) for ours and for HF's, from one initialisation; the step
    to start from: that of --state if it exists (the curve file then keeps only the rows before it)."""
    state.parent.mkdir(parents=True, exist_ok=True)
    hf = hf_twin(vocab_size, args.seed, state.parent / "hf_curve_init")
    ours = from_hf_bert(state.parent / "hf_curve_init").train()
    pairs = tuple((name, model, *adamw_warmup_linear(model, args.lr, 0.01, args.warmup, args.steps, betas=(0.9, args.beta2)))
                  for name, model in (("ours", ours), ("hf", MaskedRowsHF(hf))))
    out = Path(args.out)
    if not state.is_file():
        out.unlink(missing_ok=True)
        return pairs, 0
    saved = torch.load(state, weights_only=True)
    for name, model, opt, sched in pairs:
        model.load_state_dict(saved[name]["model"])
        opt.load_state_dict(saved[name]["opt"])
        sched.load_state_dict(saved[name]["sched"])
    kept = [r for r in out.read_text().splitlines() if json.loads(r)["step"] < saved["step"]]
    out.write_text("".join(r + "\n" for r in kept))
    print(f"resumed {state} at step {saved['step']}", flush=True)
    return pairs, saved["step"]


def evaluate_and_save(pairs, valid, step: int, args, state: Path) -> None:
    """Both models' Pre-Train Perf. appended to --out; both runs saved to --state."""
    row = {"step": step, "tokens": step * args.batch_size * 128}
    for name, model, _, _ in pairs:
        row[name] = evaluate(model, *valid, 64, True, 0, 1)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(row, flush=True)
    tmp = state.with_suffix(".tmp")
    torch.save({"step": step, **{n: {"model": m.state_dict(), "opt": o.state_dict(), "sched": s.state_dict()}
                                 for n, m, o, s in pairs}}, tmp)
    os.replace(tmp, state)


def main(argv=None) -> int:
    args = parse_args(argv)
    vocab = read_vocab(args.vocab)
    cache, log = Path(args.cache_dir), lambda m: print(m, flush=True)
    corpus = find_or_prepare([args.data], [args.valid], vocab, cache, VALID_SHARE, 0, log)
    train, valid_windows = open_corpus(corpus, vocab, 128)
    valid_seg = valid_windows[:args.valid_segments]
    special = torch.tensor([vocab.index(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")])
    mask_id = vocab.index("[MASK]")
    valid = mask_tokens(torch.from_numpy(valid_seg), special, mask_id, len(vocab), seeded(VALID_SEED))
    run = SimpleNamespace(train_seg=train, steps_per_epoch=len(train) // args.batch_size, vocab=vocab, args=args)
    state = Path(args.state)
    pairs, start = build_pair(args, len(vocab), state)
    for step in range(start, args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            evaluate_and_save(pairs, valid, step, args, state)
        if step in (args.steps, args.stop_at):
            break
        inputs, labels = global_batch(run, step, special, mask_id)    # pretrain.py's batches and masks
        for name, model, opt, sched in pairs:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(inputs, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
