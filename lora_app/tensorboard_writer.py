"""`--report-to tensorboard`: the run's scalars also as TensorBoard event files in <run>/tensorboard/, for users
who follow their runs there (`tensorboard --logdir runs`). A reporter around the run folder's own: events.jsonl
stays the contract; this only copies the numbers, through tensorboardX (protobuf only: no torch, no TensorFlow).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# event -> (tag prefix, the fields written as scalars): the same numbers the page's charts draw
SCALARS = {
    "train": ("train", ("loss", "learning_rate", "grad_norm", "reward_margin", "reward_accuracy",
                        "tokens_per_second", "peak_memory_gb")),
    "val": ("valid", ("val_loss", "reward_margin", "reward_accuracy")),
}
FOLDER = "tensorboard"


class TensorBoardReporter:
    """Passes every event and log line to `inner`, and writes the train and val events' numbers as scalars
    (tags like train/loss, valid/val_loss, at the event's step)."""

    def __init__(self, inner: Any, run_dir: Path):
        from tensorboardX import SummaryWriter

        self.inner = inner
        self.writer = SummaryWriter(str(Path(run_dir) / FOLDER), flush_secs=10)

    def event(self, kind: str, **fields: Any) -> None:
        self.inner.event(kind, **fields)
        if kind in SCALARS:
            prefix, names = SCALARS[kind]
            for name in names:
                if isinstance(fields.get(name), (int, float)):
                    self.writer.add_scalar(f"{prefix}/{name}", fields[name], int(fields["step"]))
            self.writer.flush()  # a report is seconds apart: TensorBoard shows it at once

    def log(self, message: str) -> None:
        self.inner.log(message)

    def close(self) -> None:
        self.writer.close()
