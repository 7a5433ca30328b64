"""The generation benchmark of the trainer's periodic evaluation (`eval.benchmark=NAME`).

`ouro-train` builds it and hands it to the trainer as an evaluator (the trainer knows nothing of
benchmarks): pass@1 of one sampled completion (temperature 1.0, top-p 0.7) for each of the benchmark's
first `eval.benchmark_samples` problems, and the mean recurrent steps per generated token.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ouro_train.config import RunConfig
from ouro_train.eval.answers import score_answers
from ouro_train.eval.benchmarks import DataRef, get_benchmark
from ouro_train.generation import GenerationSettings

Evaluator = Callable[[nn.Module, object], dict]


def benchmark_evaluator(run: RunConfig) -> Evaluator | None:
    """None without `eval.benchmark`. The problems are read now, so an unknown benchmark or a bad file
    fails before any data is prepared or weights are loaded."""
    e = run.eval
    if e.benchmark is None:
        return None
    data = DataRef.parse(e.benchmark_data) if e.benchmark_data else None
    problems = get_benchmark(e.benchmark).load(data, run.seed, e.benchmark_samples)
    settings = GenerationSettings(max_new_tokens=e.benchmark_max_new_tokens, think=True)

    def evaluate(model: nn.Module, tokenizer) -> dict:
        # Every rank generates the same completions (same seed), so ZeRO-3's gathers line up.
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(run.seed)
        was_training = model.training
        model.eval()
        scores = score_answers(model, tokenizer, problems, settings, run.train.micro_batch_size, generator)
        model.train(was_training)
        return {f"eval_{e.benchmark}_{key}": value for key, value in scores.items()}

    evaluate.num_problems = len(problems)
    return evaluate
