"""Kept for code written against earlier versions: ``occface.losses`` is :mod:`occface.training.losses`."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("occface.training.losses")
