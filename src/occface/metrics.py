"""Kept for code written against earlier versions: ``occface.metrics`` is :mod:`occface.evaluation.metrics`."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("occface.evaluation.metrics")
