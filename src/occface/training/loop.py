"""Multi-task training: AdaFace margin loss + QAConv pair loss + occlusion MSE, with Lightning Fabric.

    occface train --config configs/demo_cpu.yaml [section.key=value ...] [--resume]

Devices, precision (``train.precision``; ``auto``: bf16-mixed on GPU and where a CPU runs the network
faster in bf16, fp32 elsewhere) and DDP come from Fabric; under
``torchrun`` each process is one rank. Checkpoints (``last.ckpt`` every ``checkpoint_every`` steps
and at the end, ``best.ckpt`` by validation accuracy) are written atomically and hold everything a
resumed run needs, so a killed run continues where it stopped and, on CPU with a fixed seed,
reaches the same weights as an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..config import Config, ConfigError, save_config
from ..data import (IdentityBalancedSampler)
from ..models import interpolate_backbone
from .losses import LossWeights
from .objective import MultiTaskModule, build_model, class_mean_embeddings
from ..evaluation.reports import visibility_grid
from .search_calibration import calibrate_search
from .teacher_cache import TeacherCache

from .calibration import calibrate_on, trains_qaconv
from .checkpoints import atomic_save, restore_state, training_state
from .data import build_data
from .devices import cpu_training_pays_bf16, training_memory_format
from .optim import lr_factor, parameter_groups

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite)."""


class Trainer:
    """Runs one training configuration. ``fit`` returns a summary dict."""

    def __init__(self, config: Config, resume: bool = False) -> None:
        import lightning as L

        self.config = config
        self.out_dir = Path(config.train.out_dir)
        train = config.train
        accelerator = train.accelerator
        precision = train.precision
        if precision == "auto":
            uses_gpu = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
            precision = "bf16-mixed" if uses_gpu or cpu_training_pays_bf16(config) else "32-true"
        self.precision = precision
        log.info("training precision: %s (train.precision: %s)", precision, train.precision)
        self.fabric = L.Fabric(accelerator=accelerator, devices=train.devices, precision=precision)
        self.fabric.launch()
        self.memory_format = torch.contiguous_format  # decided in _setup, once the model is built
        self.fabric.seed_everything(train.seed, verbose=False)
        self.resume = resume

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        config, fabric = self.config, self.fabric
        self.data = build_data(config)
        dataset = self.data.train
        model, teacher = build_model(config)
        if config.model.freeze_backbone:
            model.backbone.requires_grad_(False)
        self.module = MultiTaskModule(model, dataset.num_classes, config, teacher)
        if config.loss.teacher_runtime == "onnx":
            if fabric.device.type != "cpu":
                raise ConfigError(f"loss.teacher_runtime=onnx runs the teacher on the CPU; this run trains on {fabric.device}")
            folder = Path(config.train.out_dir) / (f"teacher.rank{fabric.global_rank}" if fabric.world_size > 1 else "teacher")
            log.info("teacher in ONNX Runtime: %s", self.module.use_onnx_teacher(folder))
        self.cache = None
        if config.loss.distills and config.loss.teacher_cache:
            self.cache = TeacherCache(self.module.teacher_network(), dataset, mirrors=config.data.flip > 0,
                                      keep_maps=config.loss.distill_map_weight > 0, progress=config.train.progress)
        if config.model.train_from:
            self.module.freeze_backbone_before(config.model.train_from)
        if config.loss.head_init == "class_means" and not self.resume:
            if self.cache is not None:  # the teacher is the pretrained network: its cached embeddings
                centres = self.cache.class_means(dataset.targets, config.loss.head_init_images)
            else:
                precision = "bf16" if self.precision.startswith("bf16") else "fp32"
                centres = class_mean_embeddings(model, dataset, config.loss.head_init_images, precision=precision)
            self.module.margin_head.init_centres(centres)
        groups = parameter_groups(self.module, config)
        if config.optim.name == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=config.optim.lr, momentum=config.optim.momentum)
        elif config.optim.name == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=config.optim.lr)
        else:
            raise ValueError(f"unknown optim.name {config.optim.name!r}; expected sgd or adamw")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, config))
        self.sampler = IdentityBalancedSampler(dataset.targets, config.data.identities_per_batch,
                                               config.data.images_per_identity, seed=config.train.seed,
                                               rank=fabric.global_rank, world_size=fabric.world_size)
        self.weights = LossWeights(config.loss.adaface_weight, config.loss.qaconv_weight, config.loss.occlusion_weight,
                                   config.loss.occlusion_weight_start, config.loss.occlusion_warmup_steps,
                                   config.loss.distill_weight, config.loss.distill_map_weight)
        self.step, self.epoch, self.batch_in_epoch, self.bad_steps, self.skipped = 0, 0, 0, 0, 0
        self.best = -1.0
        if self.resume:
            self._load(self.out_dir / "checkpoints" / "last.ckpt")
        self.memory_format = training_memory_format(self.module, fabric.device)
        self.module.to(memory_format=self.memory_format)
        self.wrapped, self.wrapped_optimizer = fabric.setup(self.module, self.optimizer)
        self.writer = None
        if fabric.is_global_zero:
            from torch.utils.tensorboard import SummaryWriter

            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.out_dir / "config.yaml")
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))

    def _state(self) -> dict:
        return training_state(self)

    def save_checkpoint(self, name: str) -> Path:
        """Write ``OUT/checkpoints/NAME`` atomically (rank 0), then wait for every rank."""
        path = self.out_dir / "checkpoints" / name
        if self.fabric.is_global_zero:
            atomic_save(self._state(), path)
        self.fabric.barrier()
        return path

    def _load(self, path: Path) -> None:
        restore_state(self, path)

    # ------------------------------------------------------------------ loop
    def _batches(self):
        """Endless (epoch, batch) iterator that starts at the saved position."""
        while True:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            self.data.train.set_epoch(self.epoch)
            # The loader's own generator keeps it from drawing on the global RNG (dropout's), which
            # would make a resumed run diverge from an uninterrupted one.
            generator = torch.Generator().manual_seed(self.config.train.seed * 100_003 + self.epoch)
            loader = DataLoader(self.data.train, batch_sampler=self.sampler, num_workers=self.config.data.num_workers,
                                generator=generator)
            for batch in loader:
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def fit(self, stop_after: int | None = None) -> dict:
        """Train to ``train.max_steps``. ``stop_after`` ends the process's work after that step,
        as a kill would (tests use it to check resuming)."""
        self._setup()
        config, fabric = self.config, self.fabric
        train = config.train
        progress = None
        if fabric.is_global_zero and train.progress:
            from ..progress import progress_bar

            progress = progress_bar(total=train.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        started, images_seen = time.perf_counter(), 0
        batches = self._batches()
        while self.step < train.max_steps:
            batch = next(batches)
            self.batch_in_epoch += 1
            warming_up = self.step < config.model.freeze_backbone_steps
            self.module.backbone_frozen = (config.model.freeze_backbone or warming_up
                                           or config.model.backbone_bn == "frozen")
            self.wrapped.train()
            images, labels, masks = (fabric.to_device(t) for t in (batch.image, batch.label, batch.mask))
            clean = fabric.to_device(batch.clean) if batch.clean.numel() else None
            images = images.contiguous(memory_format=self.memory_format)
            clean = clean.contiguous(memory_format=self.memory_format) if clean is not None else None
            targets = self.cache.targets(batch.index, batch.view) if self.cache is not None else None
            terms = self.wrapped(images, labels, masks, clean, targets)
            weights = self.weights.at(self.step)
            total = sum(weights[k] * terms[k] for k in weights)
            finite = fabric.all_reduce(torch.isfinite(total.detach()).float(), reduce_op="min")
            self.wrapped_optimizer.zero_grad(set_to_none=True)
            if finite.item() < 1:
                self.bad_steps += 1
                self.skipped += 1
                bad = [k for k in weights if not torch.isfinite(terms[k]).all()]
                log.warning("step %d: non-finite loss (%s); update skipped", self.step + 1, ", ".join(bad) or "on another rank")
                if self.bad_steps > train.max_bad_steps:
                    raise TrainingError(f"the loss was non-finite for {self.bad_steps} steps in a row (last at step "
                                        f"{self.step + 1}: {', '.join(bad) or 'on another rank'}); stopping")
            else:
                self.bad_steps = 0
                fabric.backward(total)
                if warming_up:  # no update, and no momentum gathered, for the frozen backbone
                    for parameter in self.module.model.backbone.parameters():
                        parameter.grad = None
                if config.optim.clip_grad_norm:
                    fabric.clip_gradients(self.wrapped, self.wrapped_optimizer, max_norm=config.optim.clip_grad_norm)
                self.wrapped_optimizer.step()
            self.scheduler.step()
            self.step += 1
            images_seen += images.shape[0] * fabric.world_size
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{total.item():.3f}", pair_acc=f"{terms['pair_accuracy'].item():.2f}",
                                     img_s=f"{images_seen / (time.perf_counter() - started):.1f}", refresh=False)
            if self.writer is not None and (self.step % train.log_every == 0 or self.step == 1):
                self._log(terms, total, weights, batch, images_seen / (time.perf_counter() - started))
            if self.writer is not None and train.image_grid_every and self.step % train.image_grid_every == 0:
                count = min(8, images.shape[0])
                visibility_grid(batch.image[:count], terms["occlusion_map"][:count].cpu(), batch.mask[:count],
                                self.out_dir / "images" / f"step_{self.step:06d}.png", columns=4)
            if train.val_every and self.step % train.val_every == 0 and self.step < train.max_steps:
                self._validate()
            if train.checkpoint_every and self.step % train.checkpoint_every == 0:
                self.save_checkpoint("last.ckpt")
            if stop_after is not None and self.step >= stop_after:
                return {"stopped_at": self.step}
        if progress is not None:
            progress.close()
        elapsed = time.perf_counter() - started
        self.save_checkpoint("last.ckpt")  # the fine-tuned weights: a longer run continues from them
        alpha = config.model.interpolate_pretrained
        if alpha != 1.0:
            interpolate_backbone(self.module.model, config.model.pretrained, alpha)
            log.info("backbone interpolated with %s: alpha %g", config.model.pretrained, alpha)
        metrics = self._validate()  # calibrates what is saved
        summary = {"steps": self.step, "skipped_steps": self.skipped, "seconds": elapsed,
                   "images_per_second": images_seen / max(elapsed, 1e-9), "precision": self.precision,
                   "channels_last": self.channels_last, "validation": metrics}
        if fabric.is_global_zero:
            self._export(metrics)
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            self.writer.close()
        return summary

    @property
    def channels_last(self) -> bool:
        """Whether this run trains in channels-last memory (:func:`training_memory_format`)."""
        return self.memory_format == torch.channels_last

    def _log(self, terms: dict, total: torch.Tensor, weights: dict, batch, throughput: float) -> None:
        step, writer = self.step, self.writer
        for key in weights:
            writer.add_scalar(f"loss/{key}", terms[key].item(), step)
            writer.add_scalar(f"weight/{key}", weights[key], step)
        writer.add_scalar("loss/total", total.item(), step)
        writer.add_scalar("qaconv/pair_accuracy", terms["pair_accuracy"].item(), step)
        writer.add_scalar("lr", self.optimizer.param_groups[0]["lr"], step)
        writer.add_scalar("train/images_per_second", throughput, step)
        writer.add_scalar("train/skipped_steps", self.skipped, step)
        maps, occluded = terms["occlusion_map"].cpu(), batch.occluded
        if occluded.any():
            writer.add_scalar("visibility/occluded_mean", maps[occluded].mean().item(), step)
        if (~occluded).any():
            writer.add_scalar("visibility/clean_mean", maps[~occluded].mean().item(), step)

    def _validate(self) -> dict | None:
        if self.data.validation is None:
            return None
        metrics = None
        if self.fabric.is_global_zero:
            model = self.module.model
            self._calibration, metrics = calibrate_on(model, self.data.validation, self.config, self.fabric.device)
            model.train()
            for source, by_type in metrics.items():
                for pair_type, values in by_type.items():
                    if values.get("accuracy") is not None:
                        self.writer.add_scalar(f"val_{source}/{pair_type}", values["accuracy"], self.step)
            score = metrics.get("fused", metrics["embedding"])["all"]["accuracy"] or 0.0
            if score > self.best:
                self.best = score
                atomic_save(self._state(), self.out_dir / "checkpoints" / "best.ckpt")
        self.fabric.barrier()
        return metrics

    def _export(self, metrics: dict | None) -> None:
        """Save the model for ``OccFaceModel.from_pretrained``, calibrated on the validation pairs
        (and, with ``train.calibrate_search``, on searches of the validation people)."""
        model = self.module.model
        if metrics is not None:
            model.config.calibration = self._calibration
            model.config.calibration["precision"] = "fp32"
            if self.config.train.calibrate_search and self.data.holdout is not None and trains_qaconv(self.config):
                search = calibrate_search(model, self.data.holdout, self.data.synthesizer,
                                          seed=self.config.train.seed + 2, device=self.fabric.device)
                if search is not None:
                    model.config.calibration["search"] = search
            model.train()
        model.save_pretrained(self.out_dir / "model")
