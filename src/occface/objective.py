"""Kept for code written against earlier versions: ``occface.objective`` is :mod:`occface.training.objective`."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("occface.training.objective")
