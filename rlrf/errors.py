"""The errors a stage raises for a person to act on."""


class StageError(RuntimeError):
    """A stage cannot run as asked; the message says why and what to do."""


class ArtifactError(StageError):
    """A finished stage's file is missing, truncated, changed or unreadable; the message names the file and the
    command that rebuilds it."""
