"""`ouro-export`: a training run's checkpoint to a Hugging Face directory for inference.

    ouro-export --run outputs/run --out exports/run                  # newest complete checkpoint
    ouro-export --run outputs/lora --out exports/lora --merge        # LoRA merged into the base
    ouro-export --run outputs/lora --out exports/adapter --adapter-only
    ouro-export --run outputs/run --out exports/step100 --checkpoint outputs/run/checkpoints/step-00000100
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ouro_train.export.checkpoints import ExportError
from ouro_train.export.export import export_run, serving_note
from ouro_train.export.hf_dir import DEFAULT_MAX_SHARD_SIZE


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    mode = "merge" if args.merge else "adapter_only" if args.adapter_only else None
    start = time.perf_counter()
    try:
        out = export_run(args.run, args.out, checkpoint=args.checkpoint, mode=mode, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, remote_code_dir=args.remote_code, overwrite=args.overwrite)
    except ExportError as e:
        raise SystemExit(f"ouro-export: {e}") from None
    files = sorted(p for p in out.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(f"exported to {out} in {time.perf_counter() - start:.1f} s: {len(files)} files, {size / 2**20:.1f} MiB")
    for p in files:
        print(f"  {p.name}")
    if mode != "adapter_only":
        print(f"it {serving_note(args.run, out, args.remote_code)}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ouro-export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--run", type=Path, required=True, help="the training output directory")
    p.add_argument("--out", type=Path, required=True, help="the export directory to write")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default: the run's newest complete one)")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--merge", action="store_true", help="LoRA run: merge the adapter into the base (the default)")
    lora.add_argument("--adapter-only", action="store_true", help="LoRA run: write a peft adapter directory")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto (default): the run's export.dtype, whose own auto is the precision it trained in")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="split model.safetensors above this size (e.g. 5GB, 500MB)")
    p.add_argument("--remote-code", type=Path,
                   help="a downloaded upstream Ouro checkpoint: copy its configuration_ouro.py and modeling_ouro.py "
                        "and point auto_map at them (for vLLM and trust_remote_code loaders)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    return p


if __name__ == "__main__":
    main()
