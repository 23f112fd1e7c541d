"""The errors edgeprop raises for bad input. The CLI prints them and exits non-zero."""


class EdgepropError(Exception):
    """Bad input a user can fix: the message names what was wrong and where."""


class BundleError(EdgepropError):
    """A bundle that is missing, corrupt, tampered with, or from a newer edgeprop."""


class DataError(EdgepropError):
    """Training or evaluation data that does not fit the bundle's model."""
