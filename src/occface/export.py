"""Kept for code written against earlier versions: ``occface.export`` is :mod:`occface.runtimes.export`."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("occface.runtimes.export")
