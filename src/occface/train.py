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
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import Config, ConfigError, DataSection, load_config, save_config
from .data import (ConcatFaceDataset, FaceDataset, IdentityBalancedSampler, ImageFolderDataset, OcclusionDataset,
                   OcclusionSynthesizer, ProceduralFaceDataset, ProceduralFaces, RecordIODataset, SynthesizeOcclusion,
                   adaface_augmentation)
from .data.transforms import Compose
from .errors import InputError
from .evaluate import OcclusionPairs, evaluate_occlusion_pairs
from .models import OccFaceModel, interpolate_backbone
from .losses import LossWeights
from .metrics import evaluate_pairs, threshold_at_far
from .objective import MultiTaskModule, build_model, class_mean_embeddings, model_config
from .reports import visibility_grid
from .search_calibration import calibrate_search
from .teacher_cache import TeacherCache, cache_fits
from .scoring import (choose_fusion_weights, choose_strata_rule, describe_fusion_weight, fuse, fusion_normalization,
                      network_key, pair_strata)

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite)."""


@dataclass
class DataBundle:
    """The training dataset, the held-out identities (if any), the validation pairs drawn from
    them, and the occlusion synthesizer both use."""

    train: FaceDataset
    holdout: FaceDataset | None
    validation: OcclusionPairs | None
    synthesizer: OcclusionSynthesizer


def build_data(config: Config) -> DataBundle:
    """Training dataset (with occlusion synthesis and AdaFace augmentation) and validation pairs."""
    data, train = config.data, config.train
    synthesizer = OcclusionSynthesizer.from_directory(data.occluders, data.occlusion_kinds)
    augment = adaface_augmentation(data.flip, data.crop, data.low_res, data.photometric)
    transform = Compose([SynthesizeOcclusion(synthesizer, data.occlusion_probability), augment])  # clean faces
    common = dict(input_size=config.model.input_size, seed=train.seed)
    cached = config.loss.distills and config.loss.teacher_cache
    if cached and (changing := cache_fits(data.crop, data.low_res, data.photometric)):
        raise ConfigError(f"loss.teacher_cache: {', '.join(changing)} change the clean faces the teacher sees; "
                          "set them to 0 or loss.teacher_cache=false")
    clean = dict(clean_targets=config.loss.distills and not cached, teacher_views=cached)
    holdout: FaceDataset | None = None
    if data.extra_val_identities and not (data.source == "folder" and data.extra_paths):
        raise ConfigError("data.extra_val_identities holds identities of data.extra_paths out of training; "
                          "it needs data.source=folder and data.extra_paths")
    if data.source == "procedural":
        faces = ProceduralFaces(data.procedural_identities, data.procedural_images, data.procedural_seed, config.model.input_size)
        split = data.procedural_identities - train.val_identities
        if split < 2:
            raise ConfigError(f"data.procedural_identities={data.procedural_identities} leaves {split} training identities")
        dataset: FaceDataset = ProceduralFaceDataset(faces, list(range(split)), transform=transform, **common, **clean)
        if train.val_identities:
            holdout = ProceduralFaceDataset(faces, list(range(split, data.procedural_identities)), **common)
    elif data.source == "folder":
        if data.path is None:
            raise ConfigError("data.source=folder needs data.path")
        names, held_out = data.identities, None
        if data.split_file:
            split = json.loads(Path(data.split_file).read_text())
            names, held_out = split["train"], split.get("test")
        if names is None:
            names = identity_names(data.path, data.recursive)
        if train.val_identities or held_out is None:
            names, held_out = hold_out_last(names, train.val_identities, f"{data.path}: train.val_identities")
        dataset = ImageFolderDataset(data.path, identities=names, transform=transform,
                                     recursive=data.recursive, **common, **clean)
        if held_out:
            holdout = ImageFolderDataset(data.path, identities=held_out, recursive=data.recursive, **common)
        if data.extra_paths:
            extra, extra_held = extra_folders(data, transform, common, clean)
            paths = [data.path, *data.extra_paths]
            if len({str(Path(p).resolve()) for p in paths}) < len(paths):
                raise ConfigError(f"data.path and data.extra_paths name a folder twice: {paths}")

            def concat(parts: list[tuple[FaceDataset, str]]) -> ConcatFaceDataset:  # (dataset, its folder)
                return ConcatFaceDataset([d for d, _ in parts], None if data.merge_identities else [p for _, p in parts])

            dataset = concat([(dataset, data.path), *zip(extra, data.extra_paths)])
            if extra_held:
                own = [(holdout, data.path)] if holdout is not None else []
                holdout = concat([*own, *zip(extra_held, data.extra_paths)])
    elif data.source == "recordio":
        if data.path is None:
            raise ConfigError("data.source=recordio needs data.path (the .rec file)")
        dataset = RecordIODataset(data.path, transform=transform, **common, **clean)
    elif data.source == "occlusion":
        if data.path is None:
            raise ConfigError("data.source=occlusion needs data.path")
        dataset = OcclusionDataset(data.path, transform=augment, **common, **clean)  # real masks: no synthesis
    else:
        raise ValueError(f"unknown data.source {data.source!r}; expected procedural, folder, recordio or occlusion")
    if data.extra_occlusion_path:
        extra = OcclusionDataset(data.extra_occlusion_path, transform=augment, **common, **clean)
        dataset = ConcatFaceDataset([dataset, extra])
    dataset.mirrors = data.flip > 0
    validation = None
    if holdout is not None and (both := sorted(set(dataset.identities) & set(holdout.identities))):
        raise ConfigError(f"{len(both)} validation identities also train ({', '.join(both[:3])}): same-named "
                          "identity folders are one person; data.merge_identities=false keeps folders apart")
    if holdout is not None:
        validation = OcclusionPairs.build(holdout, synthesizer, train.val_pairs, seed=train.seed + 1)
    return DataBundle(dataset, holdout, validation, synthesizer)


def identity_names(root: str | Path, recursive: bool) -> list[str]:
    """The identity folders of ``root`` that hold images, by name (folders of other files, such as
    CFP's Protocol/, are not identities)."""
    return sorted(ImageFolderDataset(root, validate=False, recursive=recursive).identities)


def hold_out_last(names: list[str], count: int, where: str) -> tuple[list[str], list[str]]:
    """Identity names -> (those that train, the last ``count`` held out for validation); at least
    one must train."""
    if not 0 <= count < len(names):
        raise ConfigError(f"{where}={count}: expected 0 or more, leaving at least one of the {len(names)} "
                          f"identities to train on")
    return names[:len(names) - count], names[len(names) - count:]


def extra_folders(data: DataSection, transform, common: dict, clean: dict) -> tuple[list[FaceDataset], list[FaceDataset]]:
    """``data.extra_paths`` as training datasets and, with ``data.extra_val_identities`` = N, the last N
    identity folders (by name) of each as validation datasets, held out of training."""
    train_sets, held_sets = [], []
    for path in data.extra_paths:
        names = None  # every identity folder
        if data.extra_val_identities:
            names, held = hold_out_last(identity_names(path, data.recursive), data.extra_val_identities,
                                        f"{path}: data.extra_val_identities")
            held_sets.append(ImageFolderDataset(path, identities=held, recursive=data.recursive, **common))
        train_sets.append(ImageFolderDataset(path, identities=names, transform=transform, recursive=data.recursive,
                                             **common, **clean))
    return train_sets, held_sets


def parameter_groups(module: MultiTaskModule, config: Config) -> list[dict]:
    """SGD/AdamW groups: no weight decay on BatchNorm and biases; backbone lr scaled."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    backbone_ids = {id(p) for p in module.model.backbone.parameters()}
    for sub in module.modules():
        for name, parameter in sub.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            no_decay = isinstance(sub, nn.modules.batchnorm._BatchNorm) or name == "bias"
            groups.setdefault((id(parameter) in backbone_ids, no_decay), []).append(parameter)
    out = []
    for (in_backbone, no_decay), params in groups.items():
        scale = config.model.backbone_lr_scale if in_backbone else 1.0
        out.append({"params": params, "lr": config.optim.lr * scale, "weight_decay": 0.0 if no_decay else config.optim.weight_decay})
    return out


def lr_factor(step: int, config: Config) -> float:
    optim, total = config.optim, config.train.max_steps
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "multistep":
        return optim.gamma ** sum(step >= m for m in optim.milestones)
    if optim.schedule == "cosine":
        span = max(1, total - optim.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - optim.warmup_steps) / span)))
    if optim.schedule == "constant":
        return 1.0
    raise ValueError(f"unknown optim.schedule {optim.schedule!r}; expected multistep, cosine or constant")


def calibrate(scores: dict[str, np.ndarray], issame: np.ndarray, strata: np.ndarray, choose_weights: bool = True,
              far: float = 0.01, rule: dict | None = None) -> tuple[dict, np.ndarray]:
    """What a model stores from its validation pairs (scores of every source, labels, predicted
    visibility strata and the ``rule`` that gave them): the fusion's normalisation, its weights per
    stratum (:func:`choose_fusion_weights`; the spec's 0.5 if ``choose_weights`` is false), and each
    source's threshold at ``far``, the fused one on the fused scores recomputed with those weights.
    Returns (calibration, those fused scores [N])."""
    scores = dict(scores)
    normalization = fusion_normalization(scores, strata, rule)
    weight = choose_fusion_weights(scores, issame, strata) if choose_weights else 0.5
    scores["fused"] = fuse(scores, normalization, weight, strata)
    log.info("fusion shares: %s", describe_fusion_weight(weight))
    calibration: dict = {source: {"far": far, "threshold": threshold_at_far(values, issame, far)}
                         for source, values in scores.items()}
    calibration.update(normalization=normalization, fusion_weight=weight)
    return calibration, scores["fused"]


def calibrate_on(model: OccFaceModel, validation: OcclusionPairs, config: Config,
                 device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Score ``model`` on the validation pairs and return (its calibration, :func:`calibrate`, with
    the strata rule and fusion choices of ``config.train``; the metrics of every source, the fused
    one scored as the saved model will fuse: with the rule and the weights chosen on these pairs)."""
    metrics, scores, features = evaluate_occlusion_pairs(model, validation, device=device, precision="fp32")
    rule = choose_strata_rule(features.occlusion, features.occluded.numpy()) if config.train.calibrate_strata else None
    strata = pair_strata(features, validation.pairs, rule)
    calibration, fused = calibrate(scores, validation.issame, strata, config.train.calibrate_fusion, rule=rule)
    metrics["fused"] = evaluate_pairs({"fused": fused}, validation.issame, validation.types, validation.folds)["fused"]
    return calibration, metrics


def recalibrate(run_dir: str | Path) -> dict:
    """Calibrate the model a finished run saved (``RUN/model``) again, on the validation pairs its
    ``RUN/config.yaml`` draws, with this version's rules (e.g. a model trained before the fusion
    weights came from the discriminant); the weights are untouched. Returns the new calibration."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    validation = build_data(config).validation
    if validation is None:
        raise ConfigError(f"{run_dir / 'config.yaml'}: the run has no validation identities to calibrate on")
    model = OccFaceModel.from_pretrained(run_dir / "model")
    model.config.calibration, _ = calibrate_on(model, validation, config)
    if config.train.calibrate_search:
        data = build_data(config)
        search = calibrate_search(model, data.holdout, data.synthesizer, seed=config.train.seed + 2)
        if search is not None:
            model.config.calibration["search"] = search
    model.save_pretrained(run_dir / "model")
    return model.config.calibration


def atomic_save(state: dict, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def cpu_training_pays_bf16(config: Config) -> bool:
    """Whether "auto" trains in Fabric's ``bf16-mixed`` on this CPU: where the CPU has native bf16
    and the configured network's forward and backward on a batch of the configured size run at least
    1.5x faster in bf16 (measured once per process on random faces, in the memory layout training
    uses: :func:`training_memory_format`; :mod:`occface.precision`)."""
    from .precision import MIN_TRAINING_SPEEDUP, cpu_bf16_support, network_precision

    if not cpu_bf16_support()[0]:
        return False
    model = OccFaceModel(model_config(config)).train()
    batch = config.data.identities_per_batch * config.data.images_per_identity
    size = config.model.input_size
    layout = training_memory_format(model)
    model.to(memory_format=layout)
    sample = torch.rand(batch, 3, size, size).contiguous(memory_format=layout)
    key = ("training", *network_key(model)[1:])
    return network_precision(model, sample, "auto", key, backward=True, min_speedup=MIN_TRAINING_SPEEDUP) == "bf16"


def channels_last_trains(module: torch.nn.Module) -> bool:
    """Whether ``module`` can train in channels-last memory on the CPU. PyTorch 2.13's CPU backward of
    a 1x1 stride-2 convolution with fewer than 12 input channels in channels-last memory crashes the
    process (segmentation fault): IR nets below width 0.25 have such shortcuts."""
    return not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                   and m.in_channels < 16 for m in module.modules())


def training_memory_format(module: torch.nn.Module, device: str | torch.device = "cpu") -> torch.memory_format:
    """The memory layout ``module`` and its faces train in: channels-last on the CPU, where oneDNN's
    convolutions train faster (a step of 48 faces, 2 cores: MobileFaceNet 1.5x, the demo's IR-18
    1.3-1.45x, IR-50 1.1-1.3x), unless :func:`channels_last_trains` says it cannot; else contiguous."""
    on_cpu = torch.device(device).type == "cpu"
    return torch.channels_last if on_cpu and channels_last_trains(module) else torch.contiguous_format


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
        return {
            "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "skipped_steps": self.skipped, "best": self.best,
            "config": self.config.to_dict(), "num_classes": self.data.train.num_classes,
            "identities": list(self.data.train.identities),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def save_checkpoint(self, name: str) -> Path:
        path = self.out_dir / "checkpoints" / name
        if self.fabric.is_global_zero:
            atomic_save(self._state(), path)
        self.fabric.barrier()
        return path

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise InputError(f"{path}: no checkpoint to resume from (--resume continues a run of the same "
                             "train.out_dir; leave it out to start one)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["num_classes"] != self.data.train.num_classes:
            raise InputError(f"{path}: checkpoint has {state['num_classes']} classes, the data {self.data.train.num_classes} "
                             "(resume with the data the run started with)")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.skipped, self.best = state["skipped_steps"], state["best"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log.info("resumed from %s at step %d", path, self.step)

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
            from .progress import progress_bar

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
            score = metrics["fused"]["all"]["accuracy"] or 0.0
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
            if self.config.train.calibrate_search and self.data.holdout is not None:
                search = calibrate_search(model, self.data.holdout, self.data.synthesizer,
                                          seed=self.config.train.seed + 2, device=self.fabric.device)
                if search is not None:
                    model.config.calibration["search"] = search
            model.train()
        model.save_pretrained(self.out_dir / "model")
