"""Kept for code written against earlier versions: ``occface.onnx_model`` is :mod:`occface.runtimes.onnx_model`."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("occface.runtimes.onnx_model")
