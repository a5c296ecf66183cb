"""Repeat check for distributed teardown: N consecutive 2-rank runs, failures reported (not part of CI).

    python tests/repeat_distributed.py                    # 50 pretrain.py torchruns, 10 runs of the distributed tests
    python tests/repeat_distributed.py --pretrain 5 --tests 2

Each pretrain.py run is a short expert-parallel MoE + TCD run under torchrun (gloo, 2 ranks, a
checkpoint saved); each test run is `pytest -k` over every test that starts ranks. A run fails
when any process exits non-zero; its last lines are printed. Exit status: the number of failed
runs (0: every run ended cleanly).
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTED_TESTS = "two_ranks or sharded or world or expert_group or torchrun or ranks"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_command(work: Path) -> list[str]:
    docs = (ROOT / "data" / "sample.txt").read_text().split("\n\n")
    (work / "train.txt").write_text("\n\n".join(docs[:3])[:60_000])
    (work / "valid.txt").write_text(docs[-1][:8_000])
    if not (work / "teacher.pt").exists():
        subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "--data", str(work / "train.txt"), "--valid",
                        str(work / "valid.txt"), "--preset", "tiny", "--seq-len", "32", "--batch-size", "8",
                        "--max-steps", "1", "--cache-dir", str(work / "cache"), "--out", str(work / "teacher.pt")],
                       check=True, capture_output=True)
    return ["--data", str(work / "train.txt"), "--valid", str(work / "valid.txt"), "--preset", "tiny",
            "--seq-len", "32", "--batch-size", "16", "--max-steps", "4", "--moe", "--experts", "4",
            "--teacher", str(work / "teacher.pt"), "--relation-tokens", "128", "--relation-group", "32",
            "--cache-dir", str(work / "cache"), "--overwrite"]


def one_pretrain(work: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "pretrain.py"), *args, "--out", str(work / "run.pt")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def one_test_run() -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-k", DISTRIBUTED_TESTS, "-p", "no:cacheprovider"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)


def repeat(name: str, n: int, run) -> int:
    failures, t0 = 0, time.time()
    for i in range(1, n + 1):
        r = run()
        if r.returncode != 0:
            failures += 1
            tail = "\n    ".join((r.stdout + r.stderr).strip().splitlines()[-8:])
            print(f"{name} run {i}: exit {r.returncode}\n    {tail}", flush=True)
    print(f"{name}: {n - failures} of {n} runs ended with exit 0 ({time.time() - t0:.0f} s)", flush=True)
    return failures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain", type=int, default=50, help="consecutive 2-rank pretrain.py runs")
    p.add_argument("--tests", type=int, default=10, help="consecutive runs of the distributed tests")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        common = pretrain_command(work)
        failures = repeat("pretrain.py torchrun", args.pretrain, lambda: one_pretrain(work, common))
    failures += repeat("distributed tests", args.tests, one_test_run)
    return min(failures, 255)


if __name__ == "__main__":
    sys.exit(main())
