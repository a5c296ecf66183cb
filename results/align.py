"""Pick the baseline checkpoint that a TCD model is compared with (paper Tables 1-4, Fig. 5).

    python results/align.py --target runs/ckpt/moe_tcd.pt --candidates runs/ckpt/moe.*.pt            # performance
    python results/align.py --by epoch --epoch 3 --candidates runs/ckpt/moe.epoch*.pt                # epoch (Table 2)
    python results/align.py --target-perf -4.85 --candidates runs/arms/ec.epoch*.pt   # a target known by its number

Performance alignment (Tables 1, 3, 4): of the candidates at least as good as the target in Pre-Train
Perf. (the held-out masked-LM log-likelihood each checkpoint carries from pretrain.py), the closest:
the side that makes TCD's advantage harder to show, as the paper's aligned baselines are slightly
stronger than TCD. The closest candidate on the other side is reported too (--out). Epoch alignment
(Table 2): the candidate whose epoch is closest to --epoch, e.g. the teacher's epochs plus the
student's. Prints the chosen path; --out also writes it with every candidate's numbers as JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import finite_float, portable_path, write_json  # noqa: E402


class AlignError(Exception):
    """Bad input: reported as one line, exit code 2."""


def summary(path: str) -> dict:
    """{path, step, epoch, pretrain_perf} of a pretrain.py checkpoint, without reading its weights."""
    try:
        p = Path(path)                                # a sharded checkpoint's settings live in common.pt
        ckpt = torch.load(p / "common.pt" if p.is_dir() else p, map_location="cpu", weights_only=True, mmap=True)
        metrics = ckpt.get("metrics") or {}
        return {"path": portable_path(path), "step": ckpt["step"], "epoch": ckpt["epoch"], "pretrain_perf": metrics.get("pretrain_perf")}
    except Exception as e:            # noqa: BLE001 - any unreadable file is the same user error
        raise AlignError(f"{path} is not a pretrain.py checkpoint ({type(e).__name__})")


def align(target: dict | None, candidates: list[dict], by: str, epoch: float | None) -> tuple[dict, dict | None]:
    """(chosen candidate, the closest one on the other side of the target or None)."""
    if by == "perf":
        scored = [c for c in candidates if c["pretrain_perf"] is not None]
        if target is None or target["pretrain_perf"] is None or not scored:
            raise AlignError("performance alignment needs a --target and candidates "
                             "that carry a Pre-Train Perf. (evaluated at save time)")
        goal = target["pretrain_perf"]
        better = [c for c in scored if c["pretrain_perf"] >= goal]
        worse = [c for c in scored if c["pretrain_perf"] < goal]
        if not better:
            best = max(c["pretrain_perf"] for c in scored)
            raise AlignError(f"no candidate is at least as good as the target ({best:.4f} < "
                             f"{goal:.4f}): train the baseline longer")
        closest = lambda cs: min(cs, key=lambda c: abs(c["pretrain_perf"] - goal)) if cs else None
        return closest(better), closest(worse)
    if epoch is None:
        raise AlignError("--by epoch needs --epoch")
    return min(candidates, key=lambda c: abs(c["epoch"] - epoch)), None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="align.py", description=__doc__.split("\n")[0])
    p.add_argument("--candidates", nargs="+", required=True, help="baseline checkpoints (e.g. kept epochs)")
    p.add_argument("--target", help="the model to align to (performance alignment)")
    p.add_argument("--target-perf", type=finite_float, help="or its Pre-Train Perf. (e.g. from a committed curve)")
    p.add_argument("--by", choices=["perf", "epoch"], default="perf", help="performance or epoch alignment")
    p.add_argument("--epoch", type=finite_float, help="epoch to align to (--by epoch)")
    p.add_argument("--out", help="also write the choice and every candidate's numbers to this JSON")
    args = p.parse_args(argv)
    try:
        return run(args)
    except AlignError as e:
        print(f"align.py: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    if args.target and args.target_perf is not None:
        raise AlignError("give --target or --target-perf, not both")
    target = summary(args.target) if args.target else None
    if args.target_perf is not None:
        target = {"path": None, "step": None, "epoch": None, "pretrain_perf": args.target_perf}
    candidates = [summary(c) for c in args.candidates]
    chosen, other_side = align(target, candidates, args.by, args.epoch)
    if args.out:
        write_json(args.out, {"by": args.by, "epoch": args.epoch, "target": target, "chosen": chosen,
                              "other_side": other_side, "candidates": candidates})
    print(args.candidates[candidates.index(chosen)])              # as given, for the shell script's next step
    return 0


if __name__ == "__main__":
    sys.exit(main())
