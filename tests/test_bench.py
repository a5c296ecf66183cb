"""bench.py runs end to end on a tiny budget and reports well-formed ratios; peak memory is per process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
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
        assert r["expert_choice/dense"] == pytest.approx(r["expert_choice/switch"] * r["switch/dense"])
        assert r["expert_choice/dense"] > 0


def test_arms_section_times_expert_choice_and_mode(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench.py"), "--only", "arms", "--repeats", "1", "--mode-tokens", "64",
                    "--json", str(out)], check=True, capture_output=True, text=True, cwd=tmp_path)
    [row] = json.loads(out.read_text())["arms"]
    assert row["mode_tokens"] == 64
    assert row["moe_mode/moe"] == pytest.approx(row["moe_mode_ms"] / row["moe_ms"]) and row["expert_choice/moe"] > 0


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


def test_data_section_counts_the_same_tokens_as_prepare(tmp_path):
    docs = [f"document {i} " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1) for i in range(300)]
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(docs))
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench.py"), "--only", "data", "--data-text", str(text),
                    "--data-repeats", "1", "--json", str(out)], check=True, capture_output=True, text=True, cwd=tmp_path)
    [row] = json.loads(out.read_text())["data"]
    from checkpoint import make_tokenizer, read_vocab
    tok = make_tokenizer(read_vocab(ROOT / "data" / "bert-base-uncased-vocab.txt"))
    assert row["tokens"] == sum(len(tok.encode(d, add_special_tokens=False).ids) for d in docs)
    assert row["ratio"] == pytest.approx(row["prepare_tok_per_s"] / row["encode_batch_tok_per_s"]) and row["ratio"] > 0
    assert row["bytes_per_token"] == 2.0 and row["prepare_peak_mb"] > 0
