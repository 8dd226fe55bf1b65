"""Typed errors. The library raises these; the CLI turns each into a one-line message and exit code 1."""


class FlexmoeError(Exception):
    """Base class of every error flexmoe raises on purpose."""


class ConfigError(FlexmoeError):
    """A config file, flag or override is invalid (unknown key, bad value, bad name)."""


class DataError(FlexmoeError):
    """Input data is missing, empty or in an unsupported format."""


class CheckpointError(FlexmoeError):
    """A model directory, expert package or safetensors file is missing, corrupt or of the wrong kind."""


class IntegrityError(CheckpointError):
    """A file of a flexmoe folder is missing, truncated or changed: its size or sha256 differs from the manifest."""


class FingerprintMismatch(CheckpointError):
    """An expert was trained against a different anchor than the one it is combined with."""


class OutputExistsError(FlexmoeError):
    """The output path exists and --overwrite was not given."""
