"""The one interface every backend implements: named inputs in, named outputs out.

The runtime's decoding loop only sees ``Engine``; onnxruntime (CPU or CUDA provider) and TensorRT engines sit
behind it.
"""

from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np

from illume_rt.errors import IllumeError


class Engine(Protocol):
    name: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in ``output_names`` order."""
        ...


class BackendError(IllumeError, RuntimeError):
    """A backend that cannot be used here (missing package, provider or device), with the fix in the message."""
