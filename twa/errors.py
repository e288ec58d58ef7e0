"""The error of a checkpoint that cannot be used, shared by every module that reads checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe or of another model."""


def first_line(err):
    """The first line of an exception's message (some have none)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
