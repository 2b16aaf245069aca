"""The one exception type meant for users: its message names the input and the fix."""


class MMLensError(Exception):
    """A problem with the user's input or set-up, reported in one readable line."""


class SetupError(MMLensError):
    """A problem of the installation or the model that every sample would meet: a run stops at once on it."""
