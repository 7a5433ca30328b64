"""The GPU check in one run: measurement rows, each in its own process with its own time limit, in the
order the goals need them, under one global deadline; every finished row is appended at once to
`OUT/gpu_check.jsonl`, and one table is printed last (its last line says whether any check failed).

    python bench/gpu_check.py --out DIR               # what bench/gpu_check.sh runs after installing wheels
    python bench/gpu_check.py --out DIR --dry-run     # the rows, their expected seconds and commands; runs nothing
    python bench/gpu_check.py --out DIR --cpu         # every row at tiny shapes on the CPU (tests the check)

Rows: the bf16 matmul peak measured on the device (MFU is quoted against it and the data sheet); ours at
8K and 32K (full fine-tuning); the baseline (our model with upstream's settings) at 8K and 32K; with
OURO_UPSTREAM_CODE=DIR, the upstream remote code at 8K and 32K; `pytest -m cuda`; ours and the baseline at
4K and 16K; LoRA at 8K; `layer` checkpointing at 32K; the compiled layer at 8K. A row that fails or runs
past its limit is a row (status, phase, exit status, last line of its error) and the next row still runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

from common import UPSTREAM_ENV, UPSTREAM_FILES, Row, missing_upstream_files  # noqa: E402

GPU_DEADLINE_S = 420.0
FAILED = ("failed", "timeout", "interrupted")
CPU_SEQ = {4096: 64, 8192: 128, 16384: 192, 32768: 256}  # --cpu: every row at a tiny length

# Expected seconds on one H100/H200 (989 TFLOP/s dense bf16), by arithmetic: a row's start-up (Python,
# torch/DeepSpeed imports, CUDA context, the model built on the device, the DeepSpeed engine), the cold
# FlexAttention compile of a new length (ours; a later row of the same length reads inductor's cache), the
# compile of the decoder layer (compile=on), and each step's hardware FLOPs (model FLOPs + recomputed
# forwards) at an assumed hardware utilisation: 20% for upstream-style rows (the 2026-11-23 H100 anchor:
# 3,863 tok/s at 8K is 21%), 35% for ours.
PEAK_FLOPS = 989e12
START_S, MATMUL_S, PYTEST_S = 12.0, 10.0, 90.0
FLEX_COMPILE_S, FLEX_CACHED_S, LAYER_COMPILE_S = 25.0, 8.0, 60.0
UTILISATION = {"ours": 0.35, "baseline": 0.20, "upstream": 0.20}


@dataclasses.dataclass
class Check:
    """One row of the check: `kind` matmul | train (with `row`) | pytest."""

    name: str
    kind: str
    row: Row | None = None
    expected_s: float = 0.0
    limit_s: float = 0.0


def plan(cpu: bool, upstream: bool) -> list[Check]:
    shape = "tiny" if cpu else "1.4b"

    def train(name, model, seq, lora=False, checkpointing=None, compile=False):
        if checkpointing is None:
            checkpointing = "layer" if model != "ours" or seq <= 8192 else "step+layer"
        return Check(name, "train", Row(name, model=model, seq=CPU_SEQ[seq] if cpu else seq, lora=lora,
                                        checkpointing=checkpointing, compile=compile, shape=shape,
                                        iters=1 if cpu or seq > 16384 else 2))

    checks = [Check("matmul-peak", "matmul"),
              train("ours-8k", "ours", 8192), train("ours-32k", "ours", 32768),
              train("baseline-8k", "baseline", 8192), train("baseline-32k", "baseline", 32768)]
    if upstream:
        checks += [train("upstream-8k", "upstream", 8192), train("upstream-32k", "upstream", 32768)]
    checks += [Check("cuda-tests", "pytest"),
               train("ours-4k", "ours", 4096), train("baseline-4k", "baseline", 4096),
               train("ours-16k", "ours", 16384), train("baseline-16k", "baseline", 16384),
               train("lora-8k", "ours", 8192, lora=True),
               train("ours-32k-layer", "ours", 32768, checkpointing="layer"),
               train("ours-8k-compiled", "ours", 8192, compile=True)]
    seen_lengths: set[int] = set()
    for check in checks:
        check.expected_s = expected_seconds(check, seen_lengths)
        check.limit_s = 600.0 if cpu else max(60.0, 3 * check.expected_s)
    return checks


def expected_seconds(check: Check, seen_lengths: set[int]) -> float:
    """On one H100/H200 (see the constants above); `seen_lengths`: lengths whose FlexAttention kernels an
    earlier row compiled (updated)."""
    if check.kind == "matmul":
        return MATMUL_S
    if check.kind == "pytest":
        return PYTEST_S
    from ouro_train.model.flops import hardware_flops_per_token

    from common import bench_config

    row = check.row
    config = bench_config(row.shape, row.steps, row.seq)
    ckpt = row.checkpointing if row.checkpointing in ("none", "layer", "step", "step+layer") else "step+layer"
    step = hardware_flops_per_token(config, row.seq, ckpt) * row.seq / (PEAK_FLOPS * UTILISATION[row.model])
    seconds = START_S + (row.warmup + row.iters) * step
    if row.model == "ours":
        seconds += FLEX_CACHED_S if row.seq in seen_lengths else FLEX_COMPILE_S
        seen_lengths.add(row.seq)
    return seconds + (LAYER_COMPILE_S if row.compile else 0.0)


# ------------------------------------------------------------------------------ running the rows
def command(check: Check, out: Path) -> list[str]:
    py = sys.executable
    if check.kind == "pytest":
        return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/cuda",
                f"--junitxml={out / 'rows' / f'{check.name}.xml'}"]
    spec = {"kind": check.kind, "row": dataclasses.asdict(check.row) if check.row else None}
    result = out / "rows" / f"{check.name}.json"
    return [py, "bench/gpu_check.py", "--run-row", json.dumps(spec), "--result", str(result)]


def run_check(check: Check, out: Path, limit_s: float, env: dict) -> dict:
    """Run one row in its own process session; kill the whole session at the limit (compile workers
    included) and after the row ends (nothing of it outlives it)."""
    (out / "rows").mkdir(parents=True, exist_ok=True)
    log_path, result_path = out / "rows" / f"{check.name}.log", out / "rows" / f"{check.name}.json"
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(check, out), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            exit_status, status = proc.wait(timeout=limit_s), None
        except (subprocess.TimeoutExpired, Interrupted, KeyboardInterrupt) as stop:
            os.killpg(proc.pid, signal.SIGKILL)  # the row's own session: a signal to ours never reaches it
            exit_status = proc.wait()
            status = "timeout" if isinstance(stop, subprocess.TimeoutExpired) else "interrupted"
    stragglers = kill_session(proc.pid) if status is None else 0
    record = dict(status=status, exit_status=exit_status, seconds=time.monotonic() - start, log=str(log_path))
    if check.kind == "pytest":
        record.update(pytest_summary(out / "rows" / f"{check.name}.xml"))
        record.setdefault("phase", "pytest")
    elif result_path.exists():
        record.update(json.loads(result_path.read_text()))
    if stragglers:
        record["stragglers_killed"] = stragglers
    if status == "timeout":
        record["error"] = f"time limit {limit_s:.0f} s reached"
    elif status == "interrupted":
        record["error"] = "the check was stopped (SIGTERM or Ctrl-C)"
    else:
        record["status"] = "ok" if exit_status == 0 and "error" not in record else "failed"
        if record["status"] == "failed" and not record.get("error"):
            record["error"] = last_line(log_path) or f"exit status {exit_status}"
    return record


class Interrupted(Exception):
    """SIGTERM to the check (a job limit): the running row is killed and written, the rest not run."""


def raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def kill_session(pid: int) -> int:
    """SIGKILL what is left of the session `pid` led (its leader already reaped: processes the row
    started that outlived it, such as compile workers); returns how many there were."""
    import psutil

    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == pid:
                alive.append(proc)
        except (OSError, psutil.Error):
            pass
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=30)
    return len(alive)


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def pytest_summary(junit: Path) -> dict:
    """The junit report's counts; a missing report is a failure, not zero tests."""
    if not junit.exists():
        return {"error": "pytest wrote no report"}
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{c.get('classname')}.{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    summary = dict(tests=int(suite.get("tests", 0)), skipped=int(suite.get("skipped", 0)), failed_tests=failed)
    if failed:
        summary["error"] = f"{len(failed)} failed: {', '.join(failed)}"
    return summary


# -------------------------------------------------------------------------- one row, in its process
def run_row_here(spec: dict, result_path: Path) -> int:
    """The row process: tell the result file each phase as it starts, then the result; on an error,
    its last line and the phase it happened in."""
    import psutil

    state: dict = {"phase": "start", "phase_s": {"python+imports": time.time() - psutil.Process().create_time()}}
    clock = [time.monotonic()]

    def phase(name: str) -> None:  # seconds per phase: where start-up and compile time go
        now = time.monotonic()
        if state["phase"] != name:
            state["phase_s"][state["phase"]] = now - clock[0]
            clock[0] = now
        state["phase"] = name
        write_atomic(result_path, state)

    phase("start")
    try:
        import torch

        from common import matmul_peak_flops

        if spec["kind"] == "matmul":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            phase("matmul")
            n, repeats = (8192, 20) if device.type == "cuda" else (256, 3)
            state["matmul_peak_flops"] = matmul_peak_flops(device, n, repeats)
            state["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        else:
            from train_throughput import run_row

            state.update(run_row(Row(**spec["row"]), phase))
    except BaseException as error:
        state["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        write_atomic(result_path, state)
        raise
    phase("done")
    return 0


def write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------- the report
def derive(records: list[dict]) -> None:
    """× the in-run baseline (the baseline row of the same length) and MFU against the measured peak."""
    peak = next((r.get("matmul_peak_flops") for r in records if r["name"] == "matmul-peak"), None)
    baseline = {r["seq"]: r["tok_per_s"] for r in records if r.get("model") == "baseline" and r.get("tok_per_s")}
    for r in records:
        if r.get("tok_per_s") and baseline.get(r["seq"]):
            r["vs_baseline"] = r["tok_per_s"] / baseline[r["seq"]]
        if r.get("tok_per_s") and peak:
            r["mfu_measured_peak"] = r["tok_per_s"] * r["flops_per_token"] / peak


def table(records: list[dict], deadline_s: float, elapsed_s: float) -> str:
    def num(r, key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else "-"

    device = next((r["device"] for r in records if r.get("device")), "?")
    peak = next((r.get("matmul_peak_flops") for r in records if r["name"] == "matmul-peak"), None)
    lines = [f"{device}  measured matmul peak {peak / 1e12:.1f} TFLOP/s" if peak else f"{device}",
             f"{'row':<18} {'status':<8} {'seq':>6} {'ckpt':>10} {'comp':>4} {'tok/s':>8} {'×base':>5} "
             f"{'MFU':>6} {'MFUmeas':>7} {'alloc':>6} {'resv':>6} {'loss0':>6} {'s':>5} {'exp s':>5}"]
    for r in records:
        status = "not run" if r["status"].startswith("not run") else r["status"]
        head = f"{r['name']:<18} {status:<8} {r.get('seq', ''):>6} "
        if r.get("kind") == "train" and r["status"] == "ok":
            lines.append(head + f"{r['checkpointing_used']:>10} {'on' if r['compile_used'] else 'off':>4} "
                         f"{r['tok_per_s']:>8,.0f} {num(r, 'vs_baseline', '.2f'):>5} {num(r, 'mfu', '.1%'):>6} "
                         f"{num(r, 'mfu_measured_peak', '.1%'):>7} {num(r, 'peak_alloc_gib', '.1f'):>6} "
                         f"{num(r, 'peak_reserved_gib', '.1f'):>6} {r['first_loss']:>6.2f} {r['seconds']:>5.0f} "
                         f"{r['expected_s']:>5.0f}")
        elif r["status"] == "ok":
            what = (f"{r['tests']} tests, {r['skipped']} skipped, 0 failed" if r.get("kind") == "pytest"
                    else f"{r['matmul_peak_flops'] / 1e12:.1f} TFLOP/s")
            lines.append(head + f"{what:<80} {r['seconds']:>5.0f} {r['expected_s']:>5.0f}")
        elif r["status"].startswith("not run"):
            lines.append(head + f"{r['status']:<80} {'-':>5} {r['expected_s']:>5.0f}")
        else:
            lines.append(head + f"in {r.get('phase', '?')} (exit {r.get('exit_status')}): {r.get('error', '')}"[:200])
        if r.get("warning"):
            lines.append(f"{'':<18} warning: {r['warning']}")
    bad = [r for r in records if r["status"] in FAILED]
    not_run = [r["status"].split(": ")[1] for r in records if r["status"].startswith("not run")]
    skipped = len(not_run)
    tail = f"; {skipped} not run ({', '.join(sorted(set(not_run)))}; deadline {deadline_s:.0f} s)" if skipped else ""
    lines.append(f"total {elapsed_s:.0f} s{tail}")
    lines.append(f"FAILED: {len(bad)} of {len(records)} rows ({', '.join(r['name'] + ' ' + r['status'] for r in bad)})"
                 if bad else f"OK: every row that ran passed ({len(records) - skipped} of {len(records)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/gpu_check")))
    p.add_argument("--dry-run", action="store_true", help="print the rows and their commands; run nothing")
    p.add_argument("--cpu", action="store_true", help="every row at tiny shapes on the CPU")
    p.add_argument("--deadline", type=float, help=f"seconds for all rows (default {GPU_DEADLINE_S:.0f}; --cpu: 3600)")
    p.add_argument("--rows", nargs="+", metavar="NAME", help="run only these rows (names as in the dry run)")
    p.add_argument("--inject", action="append", default=[], metavar="fail:ROW|hang:ROW",
                   help="make a training row raise in its step, or hang there (then its limit is 30 s): "
                        "tests the check itself")
    p.add_argument("--run-row", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_row:
        return run_row_here(json.loads(args.run_row), args.result)

    upstream = os.environ.get(UPSTREAM_ENV)
    if upstream is not None and (missing := missing_upstream_files(upstream)):
        p.error(f"{UPSTREAM_ENV}={upstream!r}: needs the upstream remote-code files {' and '.join(UPSTREAM_FILES)} "
                f"(missing: {', '.join(missing)})")
    checks = plan(args.cpu, bool(upstream))
    names = {c.name for c in checks}
    for wanted in (args.rows or []) + [i.partition(":")[2] for i in args.inject]:
        if wanted not in names:
            p.error(f"no row {wanted!r}; rows: {', '.join(c.name for c in checks)}")
    if args.rows:
        checks = [c for c in checks if c.name in args.rows]
    for spec in args.inject:
        how, _, name = spec.partition(":")
        if how not in ("fail", "hang"):
            p.error(f"--inject {spec}: expected fail:ROW or hang:ROW")
        check = next(c for c in checks if c.name == name)
        if check.row is None:
            p.error(f"--inject {spec}: only training rows take an injected failure")
        check.row.inject = how
        check.limit_s = 30.0 if how == "hang" else check.limit_s
    deadline = args.deadline if args.deadline is not None else 3600.0 if args.cpu else GPU_DEADLINE_S
    if args.dry_run:
        print(f"{len(checks)} rows, expected {sum(c.expected_s for c in checks):.0f} s on an H100/H200, "
              f"deadline {deadline:.0f} s, results to {args.out}/gpu_check.jsonl")
        for c in checks:
            print(f"{c.name:<18} expected {c.expected_s:>4.0f} s  limit {c.limit_s:>4.0f} s  "
                  f"{' '.join(command(c, args.out))}")
        return 0

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("DS_ACCELERATOR", "cpu" if args.cpu else "cuda")
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    signal.signal(signal.SIGTERM, raise_interrupted)
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / "gpu_check.jsonl"
    jsonl.write_text("")
    start, records, first_used = time.monotonic(), [], None
    for check in checks:
        remaining = deadline - (time.monotonic() - start)
        base = dict(name=check.name, variant=check.name, kind=check.kind, expected_s=check.expected_s,
                    **({k: getattr(check.row, k) for k in ("model", "seq", "lora", "checkpointing", "compile")}
                       if check.row else {}))
        if records and records[-1]["status"].endswith("interrupted"):
            record = dict(base, status="not run: interrupted")
        elif remaining < min(check.expected_s, check.limit_s):
            record = dict(base, status="not run: time budget")
        else:
            limit = min(check.limit_s, remaining)
            print(f"[{time.monotonic() - start:5.0f} s] {check.name} (limit {limit:.0f} s)", flush=True)
            record = dict(base, time_limit_s=limit, **run_check(check, args.out, limit, env))
            used = record.get("device_used_gib_at_start")
            if used is not None:  # every row starts on a device the earlier rows have handed back
                first_used = used if first_used is None else first_used
                if used > first_used + 1.0:
                    record["warning"] = f"memory not back: {used - first_used:.1f} GiB more in use at start than row 1"
        derive([r for r in records if r["name"] == "matmul-peak"] + [record])
        records.append(record)
        with open(jsonl, "a") as f:  # one line per row as it finishes: a killed run keeps them all
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    elapsed = time.monotonic() - start
    derive(records)
    # The layout of bench/results/*.json, whose newest MFU the compute plan reads.
    report = dict(date=time.strftime("%Y-%m-%d"), device=next((r["device"] for r in records if r.get("device")), None),
                  deadline_s=deadline, seconds=elapsed, cpu=args.cpu, upstream_code=upstream, results=records)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + table(records, deadline, elapsed))
    return 1 if any(r["status"] in FAILED for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
