"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input from the user (a recipe, a dataset, a path, a flag). The message names the culprit."""

    exit_code = 2


class ConfigError(UserError):
    """A recipe or override names an unknown key or gives a value outside what is allowed."""


class DataError(UserError):
    """A dataset file or row is unusable; the message names the file, the line and the field."""


class CheckpointError(UserError):
    """A checkpoint or run directory is missing, incomplete, or would be overwritten."""


class TrainingDiverged(UserError):
    """Too many updates in a row had a non-finite loss or gradient; the message names the step and
    where the offending batch was saved."""

    exit_code = 3
