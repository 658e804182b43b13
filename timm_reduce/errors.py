"""Exceptions raised by timm_reduce."""

__all__ = ['ReduceError', 'UnsupportedModelError']


class ReduceError(ValueError):
    """Invalid strategy, option, spec or saved model. The message says what is wrong and what is allowed."""


class UnsupportedModelError(ReduceError):
    """The model has no MLP blocks that timm_reduce knows how to transform."""
