"""Error types with a meaning for the CLI's exit codes (2 = bad input, 1 = a stage failed)."""


class UserError(Exception):
    """Bad input (config, data, arguments). The message is one line naming the key, file or row. Exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration key is unknown, has the wrong type, or names a missing file."""


class DataError(UserError):
    """A dataset row or source is invalid; the message names `source:row:field`."""


class JobInputError(UserError):
    """A stage job found bad input and exited 2: the message is the job's one `error:` line. Never retried (the
    same input fails the same way)."""


class StoreError(Exception):
    """The artifact store refused an operation (bad name, missing or corrupt artifact)."""

    exit_code = 2


class ArtifactCorrupt(StoreError):
    """An artifact's files do not match its manifest (missing file, wrong size or sha256)."""


class StageFailed(Exception):
    """A stage job failed. Carries the stage name, exit code and the tail of its log. Exit code 1."""

    exit_code = 1

    def __init__(self, stage: str, message: str, returncode: int | None = None, log_tail: str = ""):
        self.stage = stage
        self.returncode = returncode
        self.log_tail = log_tail
        self.detail = message
        super().__init__(f"stage {stage!r} failed: {message}")

    def __reduce__(self):  # survives pickling (Prefect stores failed states)
        return (type(self), (self.stage, self.detail, self.returncode, self.log_tail))
