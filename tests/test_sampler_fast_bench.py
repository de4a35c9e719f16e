"""The sampler benchmark: exact settings agree with the reference, early stop saves forwards, reports are written."""

import json

import torch

from mmdlm.bench import build_parser, run_benchmark


def test_bench_reports_exact_agreement_and_savings(tmp_path):
    before = torch.get_num_threads()
    args = build_parser().parse_args([
        "--settings", "fast,fast+dual", "--grid", "32x2", "--block-length", "8", "--prompt-length", "8",
        "--answer-length", "12", "--layers", "1", "--hidden", "32", "--heads", "4", "--vocab", "64", "--threads", "1",
        "--out-dir", str(tmp_path),
    ])
    try:
        result = run_benchmark(args)
    finally:
        torch.set_num_threads(before)
    rec = {r["setting"]: r for r in result["records"]}
    assert set(rec) == {"llada", "fast", "fast+dual"}
    # The exact sampler reproduces the reference and, with EOS from answer token 12 on, stops early.
    assert rec["fast"]["exact_match_vs_llada"] == 1.0 and rec["fast"]["exact"]
    assert rec["fast"]["nfe"] < rec["llada"]["nfe"] == 32
    # The dual cache runs far fewer query tokens than full forwards.
    assert rec["fast+dual"]["query_tokens"] < rec["fast"]["query_tokens"] / 2
    # Every answer stops at the emulated EOS: 12 tokens + 0..2 of left padding offset per row.
    assert 12 * 2 <= rec["llada"]["tokens"] <= 16 * 2
    saved = json.loads((tmp_path / "bench_samplers.json").read_text())
    assert saved["records"] == result["records"]
    md = (tmp_path / "bench_samplers.md").read_text()
    assert all(f"| {name} | 32 | 2 |" in md for name in rec)
