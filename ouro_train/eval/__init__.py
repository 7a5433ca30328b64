"""Evaluation per recurrent step: loss, perplexity and exit statistics, and final-answer accuracy
against the number of steps and the early-exit threshold."""

from ouro_train.eval.answers import AnswerTask, answer_tasks, final_answer, score_answers
from ouro_train.eval.plot import plot_eval
from ouro_train.model.loss import evaluate_loss_per_step

__all__ = ["AnswerTask", "answer_tasks", "evaluate_loss_per_step", "final_answer", "plot_eval", "score_answers"]
