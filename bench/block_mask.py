"""Memory of building FlexAttention's document block mask for one packed row, before and after.

    python bench/block_mask.py                       # 8K, 32K, 64K; writes bench/results/block_mask.json
    python bench/block_mask.py --seq 8192 --json out.json

before: `create_block_mask` on the element-wise rule (what the model built until it built the mask per
tile): it evaluates the rule on all S × S pairs. after: `attention.document_block_mask`, from document
boundaries per 128 × 128 tile. Both on the CPU, one row of three documents.

Columns:
- process peak: the rise of a fresh process's peak resident set during the build (every allocation,
  the kernels' scratch included). The element-wise build is measured up to --measure-before-max
  tokens and scaled as S² beyond (it needs ~10 bytes per pair: 40 GiB at 64K).
- traced peak: the peak of the storages torch's operators create (the memory plan's tracker), under
  fake tensors for the element-wise build, so nothing is allocated.
- held: what the mask keeps for the forward and backward (its tile tables and document ids).
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path

import torch

from ouro_train.model.attention import document_block_mask, document_block_mask_bytes, document_ids
from ouro_train.train.memory import StoragePeak

MIB = 2**20
ROOT = Path(__file__).resolve().parents[1]

BUILD = {
    "after": "document_block_mask(doc_ids)",
    "before": "create_block_mask(lambda b, h, q, k: (q >= k) & (doc_ids[b, q] == doc_ids[b, k]), 1, None, seq, seq, "
              "device='cpu')",
}

PROCESS_PEAK = """
import torch
from torch.nn.attention.flex_attention import create_block_mask
from ouro_train.model.attention import document_block_mask, document_ids
{row}
def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
seq = 1024
doc_ids = row(seq)
{build}  # load the code paths first
seq = {seq}
doc_ids = row(seq)
open("/proc/self/clear_refs", "w").write("5")  # peak resident set := the current one
resident = kib("VmRSS")
mask = {build}
print((kib("VmHWM") - resident) * 1024)
"""


def row(seq: int) -> torch.Tensor:
    """Document ids of one packed row: three documents, boundaries off the tiles."""
    lengths = (seq // 4 + 3, seq // 2 - 7, seq - seq // 4 - seq // 2 + 4)
    return document_ids(torch.cat([torch.arange(n) for n in lengths])[None])


def process_peak(method: str, seq: int) -> int:
    script = PROCESS_PEAK.format(row=inspect.getsource(row), build=BUILD[method], seq=seq)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.split()[-1])


def traced_peak(method: str, seq: int) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention.flex_attention import create_block_mask

    real = row(seq)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        names = dict(doc_ids=mode.from_tensor(real), seq=seq, create_block_mask=create_block_mask,
                     document_block_mask=document_block_mask)
        with StoragePeak() as tracker:
            eval(BUILD[method], names)
    return tracker.peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 65536])
    p.add_argument("--measure-before-max", type=int, default=8192,
                   help="longest row whose element-wise build is run for real (scaled as S² beyond)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "block_mask.json"))
    args = p.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("the process peak is read from /proc (Linux)")

    measured = max(s for s in [args.measure_before_max, *args.seq] if s <= args.measure_before_max)
    before_measured = process_peak("before", measured)
    rows = []
    for seq in args.seq:
        before = (process_peak("before", seq) if seq <= args.measure_before_max
                  else round(before_measured * (seq / measured) ** 2))
        rows.append(dict(
            seq=seq,
            before_process_peak=before,
            before_scaled_from=None if seq <= args.measure_before_max else measured,
            before_traced_peak=traced_peak("before", seq),
            after_process_peak=process_peak("after", seq),
            after_traced_peak=traced_peak("after", seq),
            after_held=document_block_mask_bytes(1, seq),
        ))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=2) + "\n")

    print(f"document block mask of one packed row (CPU, torch {torch.__version__}); MiB")
    print(f"{'seq':>7} | {'before: process':>16} {'traced':>9} | {'after: process':>15} {'traced':>8} {'held':>6}")
    for r in rows:
        scaled = "*" if r["before_scaled_from"] else " "
        print(f"{r['seq']:>7} | {r['before_process_peak'] / MIB:>15.0f}{scaled} {r['before_traced_peak'] / MIB:>9.0f} | "
              f"{r['after_process_peak'] / MIB:>15.1f} {r['after_traced_peak'] / MIB:>8.1f} {r['after_held'] / MIB:>6.2f}")
    if any(r["before_scaled_from"] for r in rows):
        print(f"* scaled as S² from the measured {measured} tokens")


if __name__ == "__main__":
    main()
