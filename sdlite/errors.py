class UserError(ValueError):
    """A mistake in what the user asked for: the CLI prints its message as one line and exits non-zero."""


# What a key mapper or a config constructor raises on keys, shapes or values it cannot make sense of.
MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError)
