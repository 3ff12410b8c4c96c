"""Exceptions raised by gptq-ascend.

Every error a user can trigger with bad input derives from :class:`GPTQAscendError`, so the CLI can
print the message (which names the file, tensor or field) and exit non-zero without a traceback.
"""

from __future__ import annotations


class GPTQAscendError(Exception):
    """Base class for errors caused by the input, not by a bug."""


class ConfigError(GPTQAscendError):
    """The quantization config is missing, malformed, or asks for something unsupported."""


class FormatError(GPTQAscendError):
    """GPTQ tensors disagree with each other or with the config."""


class CheckpointError(GPTQAscendError):
    """A checkpoint file or index is missing, unsafe, truncated or corrupted."""


class BackendError(GPTQAscendError):
    """A backend cannot run the requested operation (wrong dtype, shape, device, unavailable)."""
