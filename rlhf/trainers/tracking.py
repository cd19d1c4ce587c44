"""Metrics of a run: TensorBoard (and W&B when asked), metrics.jsonl, tqdm, the PNG plot."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..models.export import is_main_process

log = logging.getLogger("rlhf")


class Tracker:
    """Records scalar metrics per step on rank 0; other ranks keep only the history."""

    def __init__(self, output: str | Path, phase: str, *, tensorboard=True, wandb=False,
                 wandb_project="rlhf", progress=True, total=None, history=None):
        self.output, self.phase = Path(output), phase
        self.history: list[dict] = list(history or [])
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
                self.bar = tqdm(total=total, desc=phase, initial=len(self.history),
                                dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
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
            self.bar.update(1)
            shown = {k: f"{v:.3g}" for k, v in list(metrics.items())[:4]}
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
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
