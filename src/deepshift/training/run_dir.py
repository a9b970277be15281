"""A run folder: its files, config.json, metrics.csv / metrics.json and curves.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from deepshift.files import atomic_path
from deepshift.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from deepshift.training.config import CheckpointError, OutputExistsError, TrainConfig

# Files a run owns in its output folder (the only ones --overwrite replaces).
RUN_FILES = ("config.json", "metrics.csv", "metrics.json", "last.pt", "best.pt", "curves.png")


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless ``overwrite`` (then remove only the run's own files)."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"output folder {out} is not empty; use --resume {out} to continue it, "
                                    "--overwrite to replace its run, or another --out")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


CSV_COLUMNS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "seconds")


def _write_csv(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


def plot_curves(path: Path, history: list[dict]) -> bool:
    """Loss and accuracy per epoch as a PNG (matplotlib Agg); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax1.plot(epochs, [r["val_loss"] for r in history], label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [r["train_top1"] for r in history], label="train top-1")
    ax2.plot(epochs, [r["val_top1"] for r in history], label="val top-1")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return True


def _read_run(out: Path) -> tuple[TrainConfig, dict | None]:
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"--resume {out}: no config.json there (not a deepshift run folder)")
    try:
        saved = json.loads(cfg_path.read_text())
        cfg = TrainConfig.from_dict(saved["train"]).resolved()
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"--resume {out}: config.json is unreadable ({exc})") from None
    state = load_checkpoint(out / "last.pt") if (out / "last.pt").exists() else None
    if state is not None and state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{out / 'last.pt'} is not a deepshift training checkpoint")
    return cfg, state
