"""Helpers for running FLUX.1 in decoupled stages on small hardware.

The notebooks in ``notebooks/`` teach the method; this package holds the mechanics they reuse:
model names and the offline tiny twin (:mod:`helpers.models`), memory budgets and hardware
(:mod:`helpers.budget`), measuring time and peak memory (:mod:`helpers.memory`), output files
(:mod:`helpers.files`) and the command line (:mod:`helpers.cli`, ``python -m helpers``).
"""

import logging

from helpers.errors import UserError


class _DropTorchvisionNotice(logging.Filter):
    """Drop transformers' notice that torchvision is missing: FLUX needs no image processor.

    diffusers imports CLIP's image processor on the way to FluxPipeline, and transformers then warns
    that torchvision (which the CPU build of torch here does without) is not installed.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionNotice())

__all__ = ["UserError"]
__version__ = "0.1.0"
