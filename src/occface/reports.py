"""Kept for code written against earlier versions: ``occface.reports`` is :mod:`occface.evaluation.reports`."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("occface.evaluation.reports")
