"""kiln as an ONNX backend (``onnx.backend.base.Backend``), so that onnx's own backend test
runner, and any framework that drives backends, runs models on kiln::

    import onnx, kiln.onnx_backend as backend
    rep = backend.prepare(onnx.load("model.onnx"))            # target "cpu"
    outputs = rep.run([x])                                     # a tuple of numpy arrays

    backend.prepare(model, target="ref")                       # any kiln target
    Ref = backend.for_target("ref")                            # a Backend class bound to one

    import onnx.backend.test
    tests = onnx.backend.test.BackendTest(backend.for_target("cpu"), __name__)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from onnx import ModelProto
from onnx.backend.base import Backend, BackendRep, namedtupledict

import kiln


class KilnRep(BackendRep):
    """A model prepared (compiled) by kiln."""

    def __init__(self, model: kiln.Model):
        self.model = model
        self._outputs = [name for name, _, _ in model.outputs]

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        """Runs on a list of arrays in input order, a dict by name, or one array."""
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        outs = self.model.run(inputs)
        return namedtupledict("Outputs", self._outputs)(*outs)


class KilnBackend(Backend):
    """The ONNX backend interface over :func:`kiln.compile`; ``target`` picks the target
    (default ``cpu``; :func:`for_target` makes a class bound to another)."""

    target = "cpu"

    @classmethod
    def is_compatible(cls, model: ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        return cls.supports_device(device)

    @classmethod
    def prepare(cls, model: ModelProto, device: str = "CPU", **kwargs: Any) -> KilnRep:
        if not cls.supports_device(device):
            raise kiln.CompileError(f"kiln's ONNX backend runs on device CPU (the host), not {device!r}")
        target = kwargs.pop("target", cls.target)
        return KilnRep(kiln.compile(model, target=target, **kwargs))

    @classmethod
    def run_model(cls, model: ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        # Every kiln target is driven from the host; simulated and emulated ones included.
        return device.upper().split(":")[0] == "CPU"


def for_target(target: str) -> type[KilnBackend]:
    """A :class:`KilnBackend` subclass that compiles for ``target``."""
    if target not in kiln.targets():
        raise kiln.CompileError(f"unknown target {target!r} (known: {', '.join(kiln.targets())})")
    return type(f"KilnBackend_{target}", (KilnBackend,), {"target": target})


def prepare(model: ModelProto, device: str = "CPU", **kwargs: Any) -> KilnRep:
    return KilnBackend.prepare(model, device, **kwargs)


def run_model(model: ModelProto, inputs: Sequence[Any], device: str = "CPU", **kwargs: Any) -> tuple:
    return KilnBackend.run_model(model, inputs, device, **kwargs)


def supports_device(device: str) -> bool:
    return KilnBackend.supports_device(device)
