"""Errors the store raises; the service maps each to a clear message (never a stack trace)."""


class ModelStoreError(Exception):
    """Base class: anything that stops a model from being stored or loaded."""


class ModelNotFound(ModelStoreError):
    pass


class InvalidModelName(ModelStoreError):
    pass


class ChecksumMismatch(ModelStoreError):
    pass


class UnsafeModel(ModelStoreError):
    """Pickled weights or remote code that the operator did not explicitly allow."""
