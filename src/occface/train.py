"""Kept for code written against earlier versions: ``occface.train`` is :mod:`occface.training`."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("occface.training")
