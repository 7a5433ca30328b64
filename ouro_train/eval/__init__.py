"""Evaluation per recurrent step: loss, perplexity and exit statistics; final-answer checking; sampled
reasoning benchmarks (pass@k) against the number of steps and the early-exit threshold."""

from ouro_train.eval.answers import (
    AnswerKind,
    Problem,
    answer_tasks,
    check_answer,
    extract_answer,
    final_answer,
    is_equivalent,
    score_answers,
)
from ouro_train.eval.benchmarks import BENCHMARKS, get_benchmark
from ouro_train.eval.plot import plot_benchmarks, plot_eval
from ouro_train.eval.sampling import pass_at_k
from ouro_train.model.loss import evaluate_loss_per_step

__all__ = [
    "BENCHMARKS",
    "AnswerKind",
    "Problem",
    "answer_tasks",
    "check_answer",
    "evaluate_loss_per_step",
    "extract_answer",
    "final_answer",
    "get_benchmark",
    "is_equivalent",
    "pass_at_k",
    "plot_benchmarks",
    "plot_eval",
    "score_answers",
]
