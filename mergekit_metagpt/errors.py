"""Errors raised by the MetaGPT merge methods."""


class MetaGPTError(ValueError):
    """Bad input for a MetaGPT merge: the message names the model and tensor."""
