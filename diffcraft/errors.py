"""One exception family: every error a user can act on names the file, field or value."""


class DiffcraftError(Exception):
    """Base of all errors the CLI prints without a traceback."""


class AudioError(DiffcraftError):
    """An audio file that cannot be used: unreadable, empty, not audio, NaN/Inf, silent, too short."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(DiffcraftError):
    """A config or study file field that is unknown, ill-typed or out of range."""


class StudyConfigError(ConfigError):
    """A study file field that is unknown, ill-typed, out of range or unschedulable."""


class DataError(DiffcraftError):
    """A dataset or feature cache that is missing, inconsistent or empty."""


class CheckpointError(DiffcraftError):
    """A checkpoint that is missing, corrupt or would execute code when loaded."""


class StorageError(DiffcraftError):
    """A storage location (folder, mount, object store) that cannot be read or written."""
