"""`eval.png`: loss (and answer accuracy) against the number of recurrent steps, and accuracy against
the mean compute (recurrent steps per token) at each early-exit threshold."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def plot_eval(result: dict, path: str | Path) -> None:
    per_step = result["per_step"]
    steps = [row["ut_steps"] for row in per_step]
    with_accuracy = "per_threshold" in result
    fig = Figure(figsize=(5 * (3 if with_accuracy else 1), 4), layout="constrained")
    axes = fig.subplots(1, 3 if with_accuracy else 1, squeeze=False)[0]

    ax = axes[0]
    ax.plot(steps, [row["loss"] for row in per_step], marker="o")
    ax.set(xlabel="recurrent steps T", ylabel="loss (supervised tokens)", title="Loss per recurrent step")
    ax.set_xticks(steps)
    trained = result.get("trained_ut_steps")
    if trained is not None:
        ax.axvline(trained, color="grey", linestyle=":", label=f"trained T = {trained}")
        ax.legend()

    if with_accuracy:
        ax = axes[1]
        ax.plot(steps, [row["accuracy"] for row in per_step], marker="o", color="tab:green")
        ax.set(xlabel="recurrent steps T", ylabel="answer accuracy", title="Accuracy per recurrent step",
               ylim=(-0.02, 1.02))
        ax.set_xticks(steps)

        ax = axes[2]
        rows = result["per_threshold"]
        ax.plot([r["mean_steps"] for r in rows], [r["accuracy"] for r in rows], marker="o", color="tab:red",
                label="early exit")
        for r in rows:
            ax.annotate(f"{r['threshold']:g}", (r["mean_steps"], r["accuracy"]), textcoords="offset points",
                        xytext=(4, 4))
        ax.plot([row["mean_steps"] for row in per_step], [row["accuracy"] for row in per_step], marker="s",
                linestyle="--", color="tab:green", label="fixed T")
        ax.set(xlabel="mean recurrent steps per token", ylabel="answer accuracy",
               title="Accuracy vs compute (exit thresholds)", ylim=(-0.02, 1.02))
        ax.legend()
    fig.savefig(path, dpi=100)


def plot_benchmarks(result: dict, path: str | Path) -> None:
    """pass@1 against T (all steps per token) and against mean recurrent steps per token (the early-exit
    thresholds, with the fixed-T points for reference); one line per benchmark."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    by_t, by_compute = fig.subplots(1, 2)
    for i, (name, scores) in enumerate(result["benchmarks"].items()):
        color = f"C{i}"
        per_step, per_threshold = scores["per_step"], scores["per_threshold"]
        by_t.plot([r["ut_steps"] for r in per_step], [r["pass@1"] for r in per_step], marker="o", color=color,
                  label=name)
        by_compute.plot([r["mean_steps"] for r in per_step], [r["pass@1"] for r in per_step], marker="s",
                        linestyle=":", color=color, label=f"{name}, fixed T")
        if per_threshold:
            by_compute.plot([r["mean_steps"] for r in per_threshold], [r["pass@1"] for r in per_threshold],
                            marker="o", color=color, label=f"{name}, early exit")
            for r in per_threshold:
                by_compute.annotate(f"{r['threshold']:g}", (r["mean_steps"], r["pass@1"]), textcoords="offset points",
                                    xytext=(4, 4), color=color)
    trained = result.get("trained_ut_steps")
    if trained is not None:
        by_t.axvline(trained, color="grey", linestyle=":", label=f"trained T = {trained}")
    by_t.set(xlabel="recurrent steps T", ylabel="pass@1", title="Accuracy per recurrent step", ylim=(-0.02, 1.02))
    by_compute.set(xlabel="mean recurrent steps per generated token", ylabel="pass@1",
                   title="Accuracy vs compute (exit thresholds)", ylim=(-0.02, 1.02))
    by_t.legend()
    by_compute.legend(fontsize="small")
    fig.savefig(path, dpi=100)
