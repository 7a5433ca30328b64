"""Writes training runs in the trainer's output layout with a real DeepSpeed engine (1 or 2 processes).

    python ds_run_writer.py ROOT --stages 0 1 2 --tokenizer DIR       # 1 process (env set here)
    torchrun --nproc_per_node 2 ds_run_writer.py ROOT --stages 3 ...  # 2 processes

For each ZeRO stage s, a full fine-tuning run and a LoRA run, under ROOT/zero{s}/{full,lora}: `model/` (config, tokenizer,
LoRA adapter config + base_model.json), two trained steps, each saved as a complete checkpoint, a
third checkpoint directory without its COMPLETE marker, and `reference/step-N.pt` with the engine's
logits on fixed inputs after step N. The LoRA base weights are saved to ROOT/lora/base.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ["DS_ACCELERATOR"] = "cpu"
for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
    os.environ.setdefault(key, value)

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_model  # noqa: E402

# as the trainer builds it: adapters on projections, and a trained copy of the exit gate
LORA = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.05,
                  target_modules=["q_proj", "v_proj", "gate_proj"], modules_to_save=["early_exit_gate"])


def write_run(root: Path, stage: int, lora: bool, tokenizer) -> None:
    rank = int(os.environ["RANK"])
    vocab = len(tokenizer)
    model = tiny_model(seed=5, vocab_size=vocab).train()
    model_dir = root / "model"
    if rank == 0:
        model.config.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    if lora:
        if rank == 0:
            model.save_pretrained(root / "base")
            LORA.save_pretrained(model_dir)
            (model_dir / "base_model.json").write_text(json.dumps({"path": str(root / "base")}))
        model = get_peft_model(model, LORA)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    gen = torch.Generator().manual_seed(rank)
    probe = torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(99))
    for step in (1, 2):
        engine.train()
        ids = torch.randint(3, vocab, (2, 16), generator=gen)
        engine.backward(engine(ids, labels=ids, use_cache=False).loss)
        engine.step()
        tag = f"step-{step:08d}"
        engine.save_checkpoint(str(root / "checkpoints"), tag=tag, save_latest=False)
        engine.eval()
        with torch.no_grad():
            logits = engine(probe, use_cache=False).logits
        dist.barrier()
        if rank == 0:
            (root / "checkpoints" / tag / "trainer_state.json").write_text(json.dumps({"step": step}))
            (root / "checkpoints" / tag / "COMPLETE").touch()
            (root / "reference").mkdir(exist_ok=True)
            torch.save({"input_ids": probe, "logits": logits}, root / "reference" / f"{tag}.pt")
    if rank == 0:  # a save that never finished
        (root / "checkpoints" / "step-00000003").mkdir()
        (root / "checkpoints" / "step-00000003" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--stages", type=int, nargs="+", required=True)
    parser.add_argument("--tokenizer", required=True)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in args.stages:
        for kind in ("full", "lora"):
            write_run(args.root / f"zero{stage}" / kind, stage, kind == "lora", tokenizer)


if __name__ == "__main__":
    main()
