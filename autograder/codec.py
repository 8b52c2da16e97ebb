"""Plain data across the sandbox boundary: JSON with tagged arrays, never pickle.

The grader decodes what the student's process sends, so decoding must not be able
to run code or build arbitrary objects: only ``None``, ``bool``, ``int``, ``float``,
``str``, ``bytes``, lists, tuples, dicts with ``str`` keys, numpy arrays and scalars of
a fixed set of dtypes, and torch tensors of those dtypes (values only: no gradient,
no quantizer) come through. Anything else is a :class:`CodecError` naming its type.

This module is copied into the sandbox beside the worker, so it imports only the
standard library, numpy and (lazily) torch.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np

MAX_DEPTH = 64
DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "float32", "float64")
TORCH_DTYPES = DTYPES[:3] + ("int16", "int32", "int64", "float16", "bfloat16", "float32", "float64")


class CodecError(TypeError):
    """A value that is not plain data, or a message that is not well formed."""


def _array(arr: np.ndarray) -> dict[str, Any]:
    if arr.dtype.name not in DTYPES:
        raise CodecError(f"numpy arrays of dtype {arr.dtype} are not supported")
    arr = np.array(arr, order="C", copy=True)  # (ascontiguousarray would make a 0-d array 1-d)
    return {"dtype": arr.dtype.name, "shape": list(arr.shape),
            "data": base64.b64encode(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()).decode()}


def _float(x: float) -> Any:
    return x if math.isfinite(x) else {"$float": repr(x)}


def _encode(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise CodecError("the value is nested too deeply")
    if value is None or type(value) is bool or type(value) is str:
        return value
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int) and not isinstance(value, np.generic):
        return int(value)
    if isinstance(value, float) and not isinstance(value, np.generic):
        return _float(float(value))
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, np.ndarray):
        return {"$ndarray": _array(value)}
    if isinstance(value, np.generic):
        return {"$npscalar": _array(np.asarray(value))}
    torch = _torch()
    if torch is not None:
        if isinstance(value, torch.Size):
            return {"$tuple": [int(v) for v in value]}
        if isinstance(value, torch.dtype):
            return {"$torchdtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.Tensor):
            return {"$tensor": _tensor(torch, value)}
    if isinstance(value, list):
        return [_encode(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, depth + 1) for v in value]}
    if isinstance(value, dict):
        if not all(type(k) is str for k in value):
            raise CodecError("dict keys must be str")
        return {"$dict": [[k, _encode(v, depth + 1)] for k, v in value.items()]}
    raise CodecError(f"a {type(value).__module__}.{type(value).__qualname__} is not plain data "
                     "(expected numbers, strings, lists, tuples, dicts, numpy arrays or torch tensors)")


def _torch() -> Any:
    import sys

    return sys.modules.get("torch")


def _tensor(torch: Any, t: Any) -> dict[str, Any]:
    if t.is_quantized:
        raise CodecError("a quantized tensor is not plain data: return its int_repr() codes")
    t = t.detach().cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name not in TORCH_DTYPES:
        raise CodecError(f"torch tensors of dtype {t.dtype} are not supported")
    if name == "bfloat16":
        payload = _array(t.contiguous().view(torch.int16).numpy())
    else:
        payload = _array(t.contiguous().numpy())
    payload["torch_dtype"] = name
    return payload


def encode(value: Any) -> bytes:
    """``value`` as UTF-8 JSON bytes; :class:`CodecError` if it is not plain data."""
    return json.dumps(_encode(value, 0), allow_nan=False, separators=(",", ":")).encode()


def _decode_array(spec: Any) -> np.ndarray:
    if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES:
        raise CodecError("malformed array")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise CodecError("malformed array shape")
    raw = base64.b64decode(spec.get("data", ""), validate=True)
    dtype = np.dtype(spec["dtype"]).newbyteorder("<")
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise CodecError("array data does not match its shape")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _decode(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise CodecError("the value is nested too deeply")
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, list):
        return [_decode(v, depth + 1) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise CodecError("malformed message")
    (tag, body), = value.items()
    if tag == "$float" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "$bytes":
        return base64.b64decode(body, validate=True)
    if tag == "$tuple" and isinstance(body, list):
        return tuple(_decode(v, depth + 1) for v in body)
    if tag == "$dict" and isinstance(body, list):
        out = {}
        for item in body:
            if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is str):
                raise CodecError("malformed dict")
            out[item[0]] = _decode(item[1], depth + 1)
        return out
    if tag == "$ndarray":
        return _decode_array(body)
    if tag == "$npscalar":
        return _decode_array(body)[()]
    if tag == "$torchdtype":
        import torch

        if body not in TORCH_DTYPES:
            raise CodecError("unsupported torch dtype")
        return getattr(torch, body)
    if tag == "$tensor":
        import torch

        if not isinstance(body, dict) or body.get("torch_dtype") not in TORCH_DTYPES:
            raise CodecError("malformed tensor")
        arr = _decode_array(body)
        if body["torch_dtype"] == "bfloat16":
            return torch.from_numpy(arr).view(torch.bfloat16)
        return torch.from_numpy(arr)
    raise CodecError(f"unknown tag {tag!r}")


def decode(data: bytes) -> Any:
    """Inverse of :func:`encode`; builds only plain data, whatever the bytes say."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"not a JSON message: {exc}") from None
    return _decode(raw, 0)
