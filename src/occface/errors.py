"""The project's error types. ``InputError`` is bad input from the user (a file, a folder, a config
value, a command-line argument): its message names the file or setting and the problem, and the
command line prints it as one line and exits 2. Anything else escaping a command is a failure of
occface itself (exit 1)."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names the file (or setting) and the problem."""
