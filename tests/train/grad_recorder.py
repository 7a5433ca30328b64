"""A Trainer that records every optimizer step's full gradient (before the update) and the rows it
trains on, for exactness tests across topologies.

    torchrun --nproc_per_node N grad_recorder.py OUT [recipe overrides]   # rank 0 writes OUT
"""

from __future__ import annotations

import sys

import torch

from ouro_train.train.trainer import Trainer


class GradRecorder(Trainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.grads: list[dict[str, torch.Tensor]] = []  # per optimizer step: name -> fp64 gradient
        self.positions: list[torch.Tensor] = []  # position ids of the rows this rank was given
        step, engine = self.engine.step, self.engine

        def recording_step(*args, **kwargs):
            if engine.is_gradient_accumulation_boundary():
                from deepspeed.utils import safe_get_full_grad

                # Collective under ZeRO: every rank assembles every gradient, in the same order.
                self.grads.append({name: safe_get_full_grad(p).detach().double().clone()
                                   for name, p in engine.module.named_parameters() if p.requires_grad})
            return step(*args, **kwargs)

        engine.step = recording_step

    def _forward(self, mb):
        self.positions.append(mb["position_ids"].clone())
        return super()._forward(mb)

    def record(self) -> dict:
        return {"grads": self.grads, "positions": self.positions}


def main() -> None:
    from hydra import compose, initialize_config_dir

    from conftest import REPO_ROOT
    from ouro_train.config import to_object

    out, overrides = sys.argv[1], sys.argv[2:]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "recipes"), version_base="1.3"):
        cfg = to_object(compose(config_name="smoke", overrides=overrides))
    trainer = GradRecorder(cfg)
    trainer.train()
    if trainer.is_main:
        torch.save(trainer.record(), out)


if __name__ == "__main__":
    main()
