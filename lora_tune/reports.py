"""Around `lora-tune eval`: lm-evaluation-harness scores, the run's eval history, the loss plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import runs
from .errors import UserError

HISTORY = "eval_history.jsonl"


def harness(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None,
    batch_size: int,
    device: str,
    include_path: Path | None = None,
) -> dict[str, float]:
    """lm-evaluation-harness scores of an in-memory model: {"task/metric": value}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            "--tasks needs lm-evaluation-harness", ["pip install 'lora-tune[eval]'"]
        ) from None
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"--tasks: unknown task {', '.join(unknown)}",
            [
                "see `lm_eval ls tasks`; a task YAML of your own goes in a folder given by --tasks-path"
            ],
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        verbosity="ERROR",
    )["results"]
    scores = {}
    for task, values in results.items():
        for key, value in values.items():
            metric = key.split(",")[0]
            if isinstance(value, float) and not metric.endswith("_stderr"):
                scores[f"{task}/{metric}"] = value
    return scores


def record_history(run: Path, report: dict) -> dict | None:
    """Append this eval to the run's history; return the previous entry on the same data, if any."""
    path = run / HISTORY
    previous = None
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("data") == report["data"]:
                previous = entry
    entry = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data": report["data"],
        "results": {
            name: {k: v for k, v in m.items() if isinstance(v, (int, float))}
            for name, m in report["results"].items()
        },
    }
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return previous


def plot_losses(run: Path, out: Path) -> None:
    """Training loss (and eval loss, when logged) against the step, from the run's metrics.json."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib", ["pip install 'lora-tune[eval]'"]) from None
    metrics = run / runs.METRICS
    history = json.loads(metrics.read_text()).get("log_history") if metrics.is_file() else None
    if not history:
        raise UserError(
            f"--plot: {run} has no training log (metrics.json with log_history)",
            ["plot a run directory written by lora-tune train"],
        )
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(e["step"], e[key]) for e in history if key in e and "step" in e]
        if points:
            ax.plot(
                *zip(*points, strict=False), marker="." if key == "eval_loss" else None, label=label
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run.name)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
