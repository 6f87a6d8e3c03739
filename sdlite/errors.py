class UserError(ValueError):
    """A mistake in what the user asked for: the CLI prints its message as one line and exits non-zero."""
