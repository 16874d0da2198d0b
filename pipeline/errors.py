"""The project's exceptions, in one small module that imports nothing.

Every command-line tool catches :class:`AlexnetError` and prints its message as one line with a
non-zero exit status; anything else is a bug and keeps its traceback.
"""


class AlexnetError(Exception):
    """A user-facing failure: the CLIs print its message as one line and exit non-zero."""


class ContractError(AlexnetError):
    """A dataset directory that does not satisfy the data contract (pipeline/artifacts.py)."""
