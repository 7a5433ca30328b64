"""bench/gpu_check.sh's driver on the CPU: the checks it would run, and its table from a report."""

import subprocess
import sys

from conftest import REPO_ROOT


def test_the_gpu_check_runs_the_cuda_tests_then_the_benchmark_with_its_baseline(tmp_path):
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path), "--dry-run"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout
    tests, bench = out.splitlines()
    assert "pytest -q -m cuda tests/cuda" in tests
    assert "--seq 4096 8192 32768 --lora-seq 8192" in bench and "--variants" not in bench  # baseline included
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_the_gpu_check_table_shows_failures_and_every_row():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from gpu_check import table

    rows = [dict(variant="baseline", seq=4096, checkpointing="layer", tok_per_s=4000.0, mfu=0.15, peak_gib=20.0,
                 vs_baseline=1.0), dict(variant="ours", seq=32768, checkpointing="step+layer", error="out of memory")]
    report = dict(device="NVIDIA H200", torch="2.11", date="2026-12-01", seconds=400.0,
                  cuda_tests={"tests": 7, "skipped": 0, "failed": ["test_cuda.test_x"]}, throughput={"results": rows})
    text = table(report)
    assert "1 failed" in text and "FAILED test_cuda.test_x" in text
    assert "4,000" in text and "15.0%" in text and "out of memory" in text
