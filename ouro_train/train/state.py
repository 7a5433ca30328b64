"""`TrainState`: everything a resumed run needs besides DeepSpeed's own states (weights, optimizer,
schedule), with `state_dict()` / `load_state_dict()` like every other stateful piece.

Global counters (the same on every rank) go to `trainer_state.json`; the data-loader position and the
RNG states are per rank and go to that rank's file (see `checkpoint.save`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ouro_train.data import MicroBatchLoader

PER_RANK = ("loader", "rng")


@dataclass
class TrainState:
    loader: MicroBatchLoader
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # real (non-padding) tokens of those steps, over all ranks
    bad_steps_in_row: int = 0  # non-finite losses ending at the last step
    bad_steps_total: int = 0

    def record_step(self, tokens: int, finite: bool) -> None:
        self.step += 1
        self.tokens_seen += tokens
        self.bad_steps_in_row = 0 if finite else self.bad_steps_in_row + 1
        self.bad_steps_total += 0 if finite else 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "bad_steps_in_row": self.bad_steps_in_row,
                "bad_steps_total": self.bad_steps_total, "loader": self.loader.state_dict(), "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.bad_steps_total = state["bad_steps_total"]
        self.bad_steps_in_row = state.get("bad_steps_in_row", 0)  # checkpoints before it was saved: 0
        self.loader.load_state_dict(state["loader"])
        if "rng" in state:  # absent on a resume on another topology: see `reseed_rng`
            set_rng_state(state["rng"])


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """Fresh RNG streams for `rank` from `step` on, distinct per (seed, step, rank): what a resume on
    another number of processes uses, since no new rank continues an old rank's stream."""
    words = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    value = int(words[0]) << 32 | int(words[1])
    random.seed(value)
    np.random.seed(int(words[0]))
    torch.manual_seed(value)  # every device's generator


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
