"""``torch.compile`` of the model's networks, in place, falling back to eager where it cannot compile.

:func:`compile_networks` compiles each network's ``forward`` with :meth:`torch.nn.Module.compile` (in
place: parameter names, and so checkpoints, stay those of the eager model). Compilation is lazy: it
happens at a network's first call, for each input shape and mode (training, evaluation) it meets. A
network that cannot be compiled there (an unsupported Python, no C++ compiler for the inductor
backend on a CPU, an operator the backend rejects) runs eagerly instead, with torch's warning in the
log, rather than stopping the run.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch._dynamo
from torch import nn

__all__ = ["compile_networks"]

log = logging.getLogger(__name__)


def compile_networks(networks: Sequence[nn.Module], options: dict | None = None) -> bool:
    """Compile ``networks`` in place with ``torch.compile(**options)``; ``False`` where torch cannot.

    Args:
        networks: modules whose ``forward`` is compiled (e.g. the loc-nets and the classifier).
        options: keyword arguments of :func:`torch.compile` (``backend``, ``mode``, ``dynamic``, ...).
    """
    if not torch._dynamo.is_dynamo_supported():
        log.warning(
            "model.compile: torch.compile is not supported on this Python/platform; the model runs EAGERLY "
            "(uncompiled). Set model.compile=false to silence this."
        )
        return False
    torch._dynamo.config.suppress_errors = True  # a network that fails to compile runs eagerly
    for network in networks:
        network.compile(**(options or {}))
    log.info("model.compile: %d networks compiled lazily with %s", len(networks), options or "torch's defaults")
    return True
