"""The output folder of a controller run: what every method writes and how a run resumes.

A run owns one folder (``--out DIR``):

- ``checkpoint.pt``: the method's state, rewritten atomically after every iteration (torch.save,
  loaded with ``weights_only=True``); a run killed at any moment resumes from it and loses at
  most the iteration in flight;
- ``log.csv``: one row per iteration (iteration, loss, a method's progress figure, wall seconds:
  the gradient norm for gradient methods, the search spread for sampling ones); on resume the
  rows past the checkpoint are dropped, so every iteration appears once;
- ``summary.json`` (atomic, at the end): at least ``initial_score``, ``final_score`` (the task's
  normalised score in [0, 1] on the run's evaluation seeds), ``iterations``, ``env_steps`` and
  ``wall_s``.

A folder that already holds a run is only continued with ``resume=True``; otherwise the run
refuses before writing anything, so no earlier result is overwritten by mistake.
"""

from __future__ import annotations

import csv
from pathlib import Path

from diffsim.core.files import atomic_file, write_json_atomic
from diffsim.errors import ConfigError, InvalidParameter

__all__ = ["RunDirectory", "atomic_file", "check_counts", "write_json_atomic"]



def check_counts(**counts) -> None:
    """Refuse any of the named budgets or sizes that is not a positive integer (bools included)."""
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidParameter(name, value, "positive integers")


class RunDirectory:
    """The folder of one run (see the module header)."""

    def __init__(self, path: str | Path, *, resume: bool, progress_field: str = "grad_norm"):
        self.path = Path(path)
        self.fields = ("iteration", "loss", progress_field, "wall_s")
        self.checkpoint = self.path / "checkpoint.pt"
        self.log = self.path / "log.csv"
        self.summary = self.path / "summary.json"
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {str(self.path)!r} is a file, not a folder; pass a folder for the run.")
        taken = [p.name for p in (self.checkpoint, self.log, self.summary) if p.exists()]
        if taken and not resume:
            raise ConfigError(f"{str(self.path)!r} already holds a run ({', '.join(taken)}); pass --resume to "
                              "continue it or another --out, nothing was overwritten.")
        self.resuming = resume and self.checkpoint.exists()
        self.path.mkdir(parents=True, exist_ok=True)

    def trim_log(self, iterations: int) -> None:
        """Keep the log rows of the first ``iterations`` iterations (those the checkpoint holds)."""
        if not self.log.exists():
            return
        with open(self.log, newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if int(row["iteration"]) < iterations]
        with atomic_file(self.log, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)

    def log_iteration(self, iteration: int, loss: float, progress: float, wall_s: float) -> None:
        """Append one iteration's row; ``progress`` goes in the method's own column."""
        new = not self.log.exists()
        with open(self.log, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(self.fields)
            writer.writerow([iteration, f"{loss:.9g}", f"{progress:.9g}", f"{wall_s:.3f}"])
            handle.flush()

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary, summary)
