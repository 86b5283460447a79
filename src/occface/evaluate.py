"""Kept for code written against earlier versions: ``occface.evaluate`` is :mod:`occface.evaluation.run`."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("occface.evaluation.run")
