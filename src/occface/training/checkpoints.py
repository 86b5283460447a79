"""Checkpoints: written atomically, holding everything a resumed run needs, so a killed CPU run
resumed with ``--resume`` reaches the same weights as an uninterrupted one."""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError


log = logging.getLogger(__name__)


def atomic_save(state: dict, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)




def training_state(trainer) -> dict:
    """Everything a resumed run needs: weights, optimiser, scheduler, data position, RNG states, config."""
    return {
        "module": trainer.module.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(), "step": trainer.step, "epoch": trainer.epoch,
        "batch_in_epoch": trainer.batch_in_epoch, "skipped_steps": trainer.skipped, "best": trainer.best,
        "config": trainer.config.to_dict(), "num_classes": trainer.data.train.num_classes,
        "identities": list(trainer.data.train.identities),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }


def restore_state(trainer, path: Path) -> None:
    """Load a checkpoint of :func:`training_state` into a set-up trainer (RNG states included)."""
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint to resume from (--resume continues a run of the same "
                         "train.out_dir; leave it out to start one)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["num_classes"] != trainer.data.train.num_classes:
        raise InputError(f"{path}: checkpoint has {state['num_classes']} classes, the data "
                         f"{trainer.data.train.num_classes} (resume with the data the run started with)")
    trainer.module.load_state_dict(state["module"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.step, trainer.epoch, trainer.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    trainer.skipped, trainer.best = state["skipped_steps"], state["best"]
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    log.info("resumed from %s at step %d", path, trainer.step)
