"""How alike a MoE checkpoint's experts are: MoDE's pull, measured the same way on any checkpoint.

    python results/expert_spread.py runs/probes/mode-a1.pt runs/probes/mode-a0.pt --valid ../shared/data/pretrain/valid.txt

For each MoE layer, on a fixed sample of held-out tokens (the same tokens for every checkpoint: the
first --tokens of the validation text, run through the model), every expert's output before the
gate: L_KD of moe.py (our reading of MoDE, the mean squared distance over ordered expert pairs),
the mean cosine similarity over expert pairs, and the mean squared norm of an expert's output
(L_KD / norm is the spread relative to the outputs' size). Prints one JSON row per checkpoint and
layer (--out also writes them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import load_checkpoint, make_tokenizer  # noqa: E402
from common import portable_path, write_json  # noqa: E402
from moe import _expert_ffn  # noqa: E402


@torch.no_grad()
def spread(ffn, tokens: torch.Tensor) -> dict:
    """L_KD, mean pairwise cosine and mean squared norm of the experts' outputs on tokens (T, H)."""
    E, T = ffn.num_experts, tokens.shape[0]
    counts = torch.full((E,), T, dtype=torch.long)
    outs = _expert_ffn(tokens.repeat(E, 1), counts, ffn.w1, ffn.b1, ffn.w2, ffn.b2).view(E, T, -1)  # (E, T, H)
    unit = F.normalize(outs, dim=-1)
    cos = torch.einsum("itd,jtd->ijt", unit, unit).mean(-1)                  # (E, E) over tokens
    off = ~torch.eye(E, dtype=torch.bool)
    return {"mode_loss": float(ffn.mutual_distillation_loss(tokens)), "pair_cosine": float(cos[off].mean()),
            "output_sq_norm": float(outs.pow(2).sum(-1).mean())}


@torch.no_grad()
def ffn_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's FFN input (the attention block's LayerNorm output, taps["trunk"][2l]), (B*T, H) each."""
    model.eval()
    taps = model.bert(ids, torch.ones_like(ids), taps=True).taps["trunk"][0::2]
    return [t.reshape(-1, t.shape[-1]) for t in taps]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="expert_spread.py", description=__doc__.split("\n")[0])
    p.add_argument("ckpts", nargs="+", help="MoE checkpoints of pretrain.py")
    p.add_argument("--valid", required=True, help="held-out text (the first --tokens of it are used)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens, in sequences of 128")
    p.add_argument("--out", help="also write the rows as JSON")
    args = p.parse_args(argv)
    rows = []
    for path in args.ckpts:
        model, ckpt = load_checkpoint(path)
        if not model.config.moe:
            print(f"expert_spread.py: error: {path} is not a MoE checkpoint", file=sys.stderr)
            return 2
        text = Path(args.valid).read_text(encoding="utf-8")[: args.tokens * 20]
        ids = make_tokenizer(ckpt["vocab"]).encode(text, add_special_tokens=False).ids
        n = min(len(ids), args.tokens) // 126 * 126
        cls, sep = ckpt["vocab"].index("[CLS]"), ckpt["vocab"].index("[SEP]")
        body = torch.tensor(ids[:n]).view(-1, 126)
        batch = torch.cat([torch.full((len(body), 1), cls), body, torch.full((len(body), 1), sep)], 1)
        for layer, (block, tokens) in enumerate(zip(model.bert.layers, ffn_inputs(model, batch))):
            row = {"ckpt": portable_path(path), "step": ckpt.get("step"), "layer": layer, **spread(block.ffn, tokens)}
            rows.append(row)
            print(json.dumps(row))
    if args.out:
        write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
