"""The tensor data types of the Open Inference Protocol and their NumPy equivalents.

One table, used by the worker (to describe a model's signature), the IPC framing and the
gateway (to decode JSON and binary tensors), so the names can never disagree.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

# v2 datatype name -> NumPy dtype. Little-endian everywhere: that is what the binary tensor
# extension puts on the wire and what LiteRT holds in memory on the machines we run on.
V2_TO_NUMPY: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

NUMPY_TO_V2: Final[dict[np.dtype[Any], str]] = {dtype: name for name, dtype in V2_TO_NUMPY.items()}


class UnsupportedDatatype(ValueError):
    """A datatype that no model here can take (BYTES, or a name the protocol does not know)."""


def numpy_dtype(v2_name: str) -> np.dtype[Any]:
    try:
        return V2_TO_NUMPY[v2_name]
    except KeyError:
        known = ", ".join(V2_TO_NUMPY)
        raise UnsupportedDatatype(
            f"unsupported datatype {v2_name!r}; expected one of {known}"
        ) from None


def v2_datatype(dtype: Any) -> str:
    try:
        return NUMPY_TO_V2[np.dtype(dtype)]
    except KeyError:
        raise UnsupportedDatatype(f"tensor type {np.dtype(dtype)} has no v2 datatype") from None
