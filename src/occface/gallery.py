"""Kept for code written against earlier versions: galleries live in :mod:`occface.galleries`."""
from .galleries import *  # noqa: F401,F403
from .galleries import __all__  # noqa: F401
