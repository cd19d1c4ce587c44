"""Metrics of a run: TensorBoard (and W&B when asked), metrics.jsonl, tqdm, the PNG plot."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..models.export import is_main_process

log = logging.getLogger("rlhf")


def tracker_for(cfg, output: str | Path, phase: str, *, total: int, history=None) -> "Tracker":
    """The Tracker of one step of a run, configured by the run's `log` section."""
    lg = cfg.log
    return Tracker(output, phase, tensorboard=lg.tensorboard, wandb=lg.wandb,
                   wandb_project=lg.wandb_project, progress=lg.progress, total=total,
                   history=history, log_every=lg.log_every)


class Tracker:
    """Records scalar metrics on rank 0; other ranks keep only the history.

    With log_every = N, the steps between two writes are averaged into one row at every N-th
    step (each metric over the steps that reported it, as HF's Trainer does with logging_steps);
    `flush()` writes what is pending (called before a checkpoint and by `close()`), so the
    history a checkpoint saves holds every step's contribution.
    """

    def __init__(self, output: str | Path, phase: str, *, tensorboard=True, wandb=False,
                 wandb_project="rlhf", progress=True, total=None, history=None, log_every=1):
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
        self.output, self.phase, self.log_every = Path(output), phase, log_every
        self.history: list[dict] = list(history or [])
        self._pending: list[tuple[int, dict[str, float]]] = []
        self.main = is_main_process()
        self.writer = self.wandb = self.bar = None
        if self.main:
            # a resumed run starts from its checkpoint's history: rows and events that an
            # earlier process logged after that checkpoint are dropped, not shown twice
            self.output.mkdir(parents=True, exist_ok=True)
            self.metrics_file = self.output / f"metrics-{phase}.jsonl"
            self.metrics_file.write_text("".join(json.dumps(row) + "\n" for row in self.history))
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                purge_step = self.history[-1]["step"] + 1 if self.history else None
                self.writer = SummaryWriter(str(self.output / "logs" / phase),
                                            purge_step=purge_step)
            if wandb:
                try:
                    import wandb as wandb_module
                    self.wandb = wandb_module.init(project=wandb_project, name=phase,
                                                   reinit=True)
                except ImportError:
                    log.warning("W&B logging asked for but wandb is not installed")
            if progress:
                from tqdm.auto import tqdm
                done = self.history[-1]["step"] if self.history else 0
                self.bar = tqdm(total=total, desc=phase, initial=done, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record step `step`; written now when step is a multiple of log_every."""
        self._pending.append((step, {k: float(v) for k, v in metrics.items()}))
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_every == 0:
            self.flush()

    def flush(self) -> None:
        """Write the pending steps as one row at the last of them (each metric averaged over the
        steps that reported it)."""
        if not self._pending:
            return
        step = self._pending[-1][0]
        sums: dict[str, list[float]] = {}
        for _, row in self._pending:
            for name, value in row.items():
                sums.setdefault(name, []).append(value)
        self._pending = []
        metrics = {name: sum(values) / len(values) for name, values in sums.items()}
        row = {"step": step, **metrics}
        self.history.append(row)
        if not self.main:
            return
        for name, value in metrics.items():
            if self.writer is not None:
                self.writer.add_scalar(f"{self.phase}/{name}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{self.phase}/{k}": v for k, v in metrics.items()}, step=step)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.bar is not None:
            shown = {k: f"{v:.3g}" for k, v in list(metrics.items())[:4]}
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def plot_history(history: list[dict], keys: list[str], path: str | Path, title: str) -> None:
    """One panel per metric against the step (PNG, rank 0)."""
    if not is_main_process() or not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in keys if any(k in row for row in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(row["step"], row[key]) for row in history if key in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
