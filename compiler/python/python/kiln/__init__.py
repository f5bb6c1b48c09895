"""kiln: an AI compiler for domestic accelerators, from Python.

    import kiln, numpy as np
    model = kiln.compile("model.onnx", target="cpu")      # a path, bytes or an onnx.ModelProto
    (y,) = model.run({"x": np.ones((1, 3, 224, 224), np.float32)})   # or model.run([x])

Compiling and running release the GIL. Errors raise subclasses of :class:`KilnError`:
:class:`ModelError` (unreadable or invalid model), :class:`CompileError` (unknown target, model
not compilable), :class:`InputError` (wrong input count, name, dtype or shape) and
:class:`RunError`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence, Union

import numpy as np

from ._kiln import (  # noqa: F401  (re-exported)
    CompileError,
    InputError,
    KilnError,
    ModelError,
    RunError,
    __version__,
)
from . import _kiln

__all__ = [
    "compile",
    "tune",
    "targets",
    "Model",
    "KilnError",
    "ModelError",
    "CompileError",
    "InputError",
    "RunError",
    "__version__",
]

ModelLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]


def targets() -> list[str]:
    """Names of the targets kiln compiles for (``cpu``, ``ref``, ``npu``, ``rvv``, ...)."""
    return list(_kiln.targets())


def _source(model: ModelLike) -> tuple[str, Any, str]:
    """("file", path, path) or ("bytes", data, name)."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return "bytes", bytes(model), "model"
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        return "file", path, path
    if hasattr(model, "SerializeToString"):  # an onnx.ModelProto
        name = getattr(getattr(model, "graph", None), "name", "") or "model"
        return "bytes", model.SerializeToString(), name
    raise TypeError(f"kiln.compile: expected a path, bytes or an onnx.ModelProto, got {type(model).__name__}")


def _to_native(a: Any) -> Any:
    """An input as the native module takes it: a numpy array of a numeric or bool dtype, or
    ``(onnx code, bytes, shape)`` for types numpy lacks (ml_dtypes' bfloat16, float8, int4...),
    or ``("str", [str], shape)``."""
    a = np.asarray(a)
    if a.dtype.kind in "USO":
        return ("str", [str(x) for x in a.reshape(-1)], list(a.shape))
    if a.dtype.kind == "V" or a.dtype.name not in _NUMPY_NATIVE:
        from onnx import helper

        try:
            code = helper.np_dtype_to_tensor_dtype(a.dtype)
        except (KeyError, ValueError, TypeError):
            return a  # refused by the native module with a clear message
        return (int(code), np.ascontiguousarray(a).tobytes(), list(a.shape))
    return a


def _from_native(o: Any) -> np.ndarray:
    if isinstance(o, np.ndarray):
        return o
    kind, payload, shape = o
    if kind == "str":
        return np.array(payload, dtype=object).reshape(shape)
    from onnx import helper

    return np.frombuffer(payload, dtype=helper.tensor_dtype_to_np_dtype(kind)).reshape(shape).copy()


_NUMPY_NATIVE = {
    "float16", "float32", "float64", "bool",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
}


class Model:
    """A model compiled for one target. ``inputs``/``outputs`` list ``(name, dtype, shape)``,
    where a symbolic dim is its name (any size runs)."""

    def __init__(self, native: Any):
        self._m = native
        self._input_names = [name for name, _, _ in native.inputs]
        self._output_names = [name for name, _, _ in native.outputs]

    @property
    def inputs(self) -> list[tuple[str, str, list]]:
        return [(n, d, list(s)) for n, d, s in self._m.inputs]

    @property
    def outputs(self) -> list[tuple[str, str, list]]:
        return [(n, d, list(s)) for n, d, s in self._m.outputs]

    @property
    def target(self) -> str:
        return self._m.target

    def kernel_counts(self) -> tuple[int, int]:
        """(kernels compiled to the target's code, kernels run by the host's reference code)."""
        return self._m.kernel_counts()

    def run(self, inputs: Union[Mapping[str, Any], Sequence[Any]]) -> list[np.ndarray]:
        """Runs the model. ``inputs`` maps input names to arrays, or lists arrays in input
        order; anything ``numpy.asarray`` accepts works. Returns numpy arrays in output order."""
        if isinstance(inputs, Mapping):
            unknown = [k for k in inputs if k not in self._input_names]
            if unknown:
                raise InputError(
                    f"the model has no input {unknown[0]!r} (inputs: {', '.join(self._input_names)})"
                )
            missing = [k for k in self._input_names if k not in inputs]
            if missing:
                raise InputError(f"input {missing[0]!r} is missing (inputs: {', '.join(self._input_names)})")
            ordered = [inputs[k] for k in self._input_names]
        elif isinstance(inputs, (list, tuple)):
            ordered = list(inputs)
        else:
            raise TypeError(f"Model.run: expected a dict or a list of arrays, got {type(inputs).__name__}")
        return [_from_native(o) for o in self._m.run_list([_to_native(a) for a in ordered])]

    def run_dict(self, inputs: Union[Mapping[str, Any], Sequence[Any]]) -> dict[str, np.ndarray]:
        """Like :meth:`run`, returning ``{output name: array}``."""
        return dict(zip(self._output_names, self.run(inputs)))

    def __repr__(self) -> str:
        ins = ", ".join(f"{n}: {d}{s}" for n, d, s in self.inputs)
        return f"<kiln.Model target={self.target} inputs=({ins})>"


def compile(
    model: ModelLike,
    target: str = "cpu",
    *,
    fusion: bool = True,
    threads: int = 0,
    dims: Mapping[str, int] | None = None,
    tuning_db: str | os.PathLike | None = None,
) -> Model:
    """Compiles ``model`` (a path, bytes, or an ``onnx.ModelProto``) for ``target``.

    ``fusion``: e-graph rewriting and kernel fusion; ``threads``: threads native kernels use
    (0: every core); ``dims``: sizes of symbolic dims to price fusion with (the model still runs
    at any size); ``tuning_db``: compile each kernel with its best schedule in this tuning
    database (see :func:`tune`)."""
    kind, src, name = _source(model)
    opts = dict(
        target=target,
        fusion=fusion,
        threads=threads,
        dims=list((dims or {}).items()),
        tuning_db=os.fspath(tuning_db) if tuning_db is not None else None,
    )
    if kind == "file":
        return Model(_kiln.compile_file(src, **opts))
    return Model(_kiln.compile_bytes(src, name, **opts))


def tune(
    model: ModelLike,
    tuning_db: str | os.PathLike,
    target: str = "cpu",
    *,
    trials: int = 32,
    budget_s: float | None = None,
    resume: bool = False,
    strategy: str = "learned",
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
) -> dict:
    """Tunes each kernel of ``model`` on ``target`` (``cpu``: wall time; ``npu``: simulated
    cycles), appending every measurement to ``tuning_db`` (JSON lines). Returns the report:
    per kernel its default and best cost, trials and best-so-far after each one. Then
    ``kiln.compile(model, target, tuning_db=...)`` uses the best schedules."""
    import json

    kind, src, name = _source(model)
    if kind == "file":
        with open(src, "rb") as f:
            src = f.read()
    return json.loads(
        _kiln.tune_bytes(
            src,
            name,
            os.fspath(tuning_db),
            target=target,
            trials=trials,
            budget_s=budget_s,
            resume=resume,
            strategy=strategy,
            seed=seed,
            dims=list((dims or {}).items()),
        )
    )
