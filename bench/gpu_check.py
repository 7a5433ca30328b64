"""The GPU check in one run: `pytest -m cuda`, then the training-step benchmark at 4K/8K/32K (full
fine-tuning and, at 8K, LoRA) with its in-run baseline; writes `OUT/gpu_check.json` and prints one table.

    python bench/gpu_check.py --out DIR          # what bench/gpu_check.sh runs after installing wheels
    python bench/gpu_check.py --out DIR --dry-run   # print the commands, run nothing

Sized for ≤ 8 minutes on one H100/H200 with start-up: every check runs, each with few iterations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commands(out: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "cuda_tests": [py, "-m", "pytest", "-q", "-m", "cuda", "tests/cuda", f"--junitxml={out / 'cuda_tests.xml'}"],
        "throughput": [py, "bench/train_throughput.py", "--seq", "4096", "8192", "32768", "--lora-seq", "8192",
                       "--warmup", "1", "--iters", "2", "--json", str(out / "train_throughput.json")],
    }


def cuda_test_summary(junit: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not junit.exists():
        return {"error": "no report"}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [f"{c.get('classname')}.{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"tests": int(suite.get("tests", 0)), "skipped": int(suite.get("skipped", 0)), "failed": failed}


def table(report: dict) -> str:
    t = report["cuda_tests"]
    lines = [f"{report['device']}  torch {report['torch']}  {report['date']}",
             f"pytest -m cuda: {t.get('tests', 0)} tests, {len(t.get('failed', []))} failed, {t.get('skipped', 0)} skipped"
             + "".join(f"\n  FAILED {name}" for name in t.get("failed", [])),
             f"{'seq':>6} {'variant':>10} {'ckpt':>10} {'tok/s':>9} {'MFU':>7} {'peak GiB':>9} {'× base':>7}"]
    for r in report.get("throughput", {}).get("results", []):
        if "error" in r:
            lines.append(f"{r['seq']:>6} {r['variant']:>10} {r['error']:>46}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        ratio = f"{r['vs_baseline']:.2f}" if "vs_baseline" in r else "-"
        lines.append(f"{r['seq']:>6} {r['variant']:>10} {r['checkpointing']:>10} {r['tok_per_s']:>9,.0f} {mfu:>7} "
                     f"{peak:>9} {ratio:>7}")
    lines.append(f"total {report['seconds']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = p.parse_args()
    steps = commands(args.out)
    if args.dry_run:
        for name, cmd in steps.items():
            print(f"{name}: {' '.join(cmd)}")
        return
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    returncodes = {name: subprocess.run(cmd, cwd=REPO).returncode for name, cmd in steps.items()}
    throughput_file = args.out / "train_throughput.json"
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "returncodes": returncodes,
        "cuda_tests": cuda_test_summary(args.out / "cuda_tests.xml"),
        "throughput": json.loads(throughput_file.read_text()) if throughput_file.exists() else {},
        "seconds": time.time() - start,
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + table(report))
    sys.exit(0 if not any(returncodes.values()) else 1)


if __name__ == "__main__":
    main()
