"""bench.py runs end to end on a tiny budget and reports well-formed ratios; peak memory is per process."""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_moe_section_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench.py"), "--only", "moe", "--repeats", "1", "--json", str(out)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)
    rows = json.loads(out.read_text())["moe"]
    assert [r["tokens"] for r in rows] == [16384, 4096]
    for r in rows:
        assert r["switch/dense"] == r["switch_ms"] / r["dense_ms"] > 0
        assert r["busiest/mean expert load"] >= 1.0


def test_peak_memory_is_the_child_process_own():
    from bench import peak_rss_mb
    big = torch.ones(300 * 2**20 // 4)                     # 300 MB touched in this process
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert peak_rss_mb() > child + 250                     # ru_maxrss would give the child this process's peak
    del big


def test_memory_section_runs_both_allocators(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench.py"), "--only", "memory", "--memory-steps", "2", "--json",
                    str(out)], check=True, capture_output=True, text=True, cwd=tmp_path)
    rows = json.loads(out.read_text())["memory"]
    assert [r["allocator"] for r in rows] == ["tuned", "default"]
    assert all(r["steps"] == 2 and r["tokens_per_s"] > 0 and r["peak_mb_at_end"] > 100 for r in rows)
