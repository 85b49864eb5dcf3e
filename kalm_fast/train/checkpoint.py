"""Checkpoints of a training stage: ``<stage>/checkpoints/step-NNNNNN/{model,state}``, written atomically, resumed
without unpickling; and the safetensors weights of a model folder loaded into an Embedder."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from kalm_fast.atomic import fsync_tree, write_text
from kalm_fast.model import Embedder
from kalm_fast.train.step import _rng_state, _set_rng_state


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses); the last good checkpoint is kept."""


def load_weights(embedder: Embedder, folder: Path) -> None:
    """The safetensors weights of a model folder into ``embedder.model``, exactly (no dtype round trip)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = embedder.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


class Checkpoints:
    """``<stage>/checkpoints/step-NNNNNN/{model,state}`` written atomically; ``latest`` names the newest complete one.
    Only the newest keeps its optimizer state (resume needs nothing else); older model folders stay as soup
    candidates (the newest ``keep`` of them when keep > 0)."""

    def __init__(self, folder: Path, keep: int = 0):
        self.folder = folder
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.folder / "latest"
        if not pointer.is_file():
            return None
        path = self.folder / pointer.read_text().strip()
        return path if (path / "state" / "trainer.json").is_file() else None

    def models(self) -> list[Path]:
        return sorted(p / "model" for p in self.folder.glob("step-*") if (p / "model").is_dir())

    def save(self, step: int, embedder: Embedder, optimizer, scheduler, trainer_state: dict, device) -> Path:
        name = f"step-{step:06d}"
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            embedder.save_pretrained(tmp / "model")
            (tmp / "state").mkdir()
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": _rng_state(device)}, tmp / "state" / "optimizer.pt")
            (tmp / "state" / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
            fsync_tree(tmp)
            final = self.folder / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_text(self.folder / "latest", name)
        self._prune(final)
        return final

    def _prune(self, newest: Path) -> None:
        older = sorted(p for p in self.folder.glob("step-*") if p != newest)
        for p in older:
            shutil.rmtree(p / "state", ignore_errors=True)
        if self.keep:
            for p in older[: max(0, len(older) - (self.keep - 1))]:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path, embedder: Embedder, optimizer, scheduler, device) -> dict:
        """Resumes from ``path``. Nothing is unpickled: the optimizer, scheduler and RNG states are tensors,
        numbers, strings and containers, loaded with ``weights_only=True`` -- a replaced file in a shared output
        folder cannot run code, it is refused."""
        state_file = path / "state" / "optimizer.pt"
        try:
            blob = torch.load(state_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise TrainingError(f"{state_file}: refused to load (it holds more than tensors and plain values: "
                                f"not a file this trainer wrote): {str(e).splitlines()[0]}") from None
        load_weights(embedder, path / "model")
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        _set_rng_state(blob["rng"], device)
        return json.loads((path / "state" / "trainer.json").read_text())
