"""Kept for code written against earlier versions: the photo pipeline lives in :mod:`occface.photos`."""
from .photos import *  # noqa: F401,F403
from .photos import __all__  # noqa: F401
