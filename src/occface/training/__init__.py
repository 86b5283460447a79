"""Multi-task training and fine-tuning.

    from occface.training import Trainer
    from occface.config import load_config
    Trainer(load_config("configs/demo_cpu.yaml")).fit()

Modules: ``data`` (datasets, held-out people, validation pairs), ``objective`` (the model, its margin
head, the loss terms and the frozen teacher as one module), ``losses``, ``teacher_cache`` (the
teacher's targets computed once), ``optim`` (parameter groups, schedule), ``devices`` (precision
and memory layout on CPUs), ``checkpoints`` (atomic, resumable), ``calibration`` and
``search_calibration`` (what a trained model stores from its validation people), ``loop`` (Trainer).
"""
from .calibration import calibrate, calibrate_on, recalibrate
from .checkpoints import atomic_save
from .data import DataBundle, build_data, extra_folders, hold_out_last, identity_names
from .devices import channels_last_trains, cpu_training_pays_bf16, training_memory_format
from .loop import Trainer, TrainingError
from .objective import MultiTaskModule, build_model, class_mean_embeddings, model_config
from .optim import lr_factor, parameter_groups
from .search_calibration import calibrate_search
from .teacher_cache import TeacherCache

__all__ = ["DataBundle", "MultiTaskModule", "TeacherCache", "Trainer", "TrainingError", "atomic_save", "build_data",
           "build_model", "calibrate", "calibrate_on", "calibrate_search", "channels_last_trains",
           "class_mean_embeddings", "cpu_training_pays_bf16", "extra_folders", "hold_out_last", "identity_names",
           "lr_factor", "model_config", "parameter_groups", "recalibrate", "training_memory_format"]
