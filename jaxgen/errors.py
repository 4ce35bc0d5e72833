"""Exception types. Every message says what was wrong and what to do about it."""


class JaxgenError(Exception):
    """Base class of jaxgen's own errors."""


class ConfigError(JaxgenError, ValueError):
    """A config field is unknown, missing or set to a value jaxgen does not implement."""


class WeightError(JaxgenError, ValueError):
    """A weight file is missing, corrupt, mis-keyed or mis-shaped."""


class DataError(JaxgenError, ValueError):
    """A dataset is missing, or an input image has the wrong shape, dtype or content."""


class CheckpointError(JaxgenError, RuntimeError):
    """A checkpoint cannot be written or restored."""


class NonFiniteError(JaxgenError, FloatingPointError):
    """A loss or gradient became NaN or Inf during training."""
