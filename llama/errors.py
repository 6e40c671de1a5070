"""Exception classes the package raises for bad input and failed peers."""


class InputError(ValueError, AssertionError):
    """A bad argument, prompt or dialog.

    Also an ``AssertionError`` so that callers of Meta's reference, which asserted on these
    inputs, keep catching it.
    """


class CheckpointError(ValueError):
    """A checkpoint folder, shard or ``params.json`` that cannot be used as it is."""


class DistributedError(RuntimeError):
    """Another rank failed, exited or timed out while this one waited for it."""
