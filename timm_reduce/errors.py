"""Exceptions raised by timm_reduce."""

__all__ = ['HubError', 'ReduceError', 'UnsupportedModelError']


class ReduceError(ValueError):
    """Invalid strategy, option, spec or saved model. The message says what is wrong and what is allowed."""


class UnsupportedModelError(ReduceError):
    """The model has no MLP blocks that timm_reduce knows how to transform."""


class HubError(ReduceError):
    """A Hugging Face Hub operation failed or was refused (invalid repo id, no token, network failure)."""
