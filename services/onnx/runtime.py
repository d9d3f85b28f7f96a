"""The ONNX runtime: one onnxruntime InferenceSession per model instance.

The model manager (services/core) creates one OnnxRuntime per instance of a model version whose
config names backend "onnxruntime" or platform "onnxruntime_onnx", then the scheduler calls
``infer`` with whole batches (numpy arrays keyed by input name) from a worker thread; onnxruntime
releases the GIL while it runs. Session settings and execution providers come from the config
(services/onnx/session_options.py); missing config fields from the model file
(services/onnx/autocomplete.py).

BYTES tensors: the kit carries them as object arrays of ``bytes``; onnxruntime's string tensors
hold UTF-8 text, so inputs are decoded (non-UTF-8 bytes are a caller error) and outputs encoded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import InternalError, InvalidArgument, ModelLoadError, Unavailable
from services.core.requests import Array
from services.core.runtime import InstanceSpec, Runtime
from services.onnx import autocomplete as ac
from services.onnx.session_options import CPU, plan_session

logger = logging.getLogger(__name__)

_ONNX_STRING = "tensor(string)"


def _decode(value: object) -> object:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _encode(value: object) -> object:
    return value.encode("utf-8") if isinstance(value, str) else value


_decode_all = np.frompyfunc(_decode, 1, 1)
_encode_all = np.frompyfunc(_encode, 1, 1)


def _to_text(name: str, array: Array) -> Array:
    """Object array of bytes → object array of str, as onnxruntime's string tensors want."""
    try:
        return np.asarray(_decode_all(array), dtype=object)
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"input '{name}' holds bytes that are not valid UTF-8 ({exc.reason} at byte "
            f"{exc.start}); ONNX string tensors carry UTF-8 text"
        ) from None


def _to_bytes(array: Array) -> Array:
    return np.asarray(_encode_all(array), dtype=object)


def _resolve_model_file(model_path: Path) -> Path:
    """Triton accepts ``model.onnx`` as a directory holding ``model.onnx`` (external weights)."""
    return model_path / "model.onnx" if model_path.is_dir() else model_path


class OnnxRuntime(Runtime):
    """Serves ONNX models with onnxruntime (CPU by default; CUDA/TensorRT/OpenVINO by config)."""

    backend: ClassVar[str] = "onnxruntime"
    platforms: ClassVar[tuple[str, ...]] = ("onnxruntime_onnx",)
    default_model_filename: ClassVar[str] = "model.onnx"

    @classmethod
    def autocomplete(cls, config: mc.ModelConfig, model_path: Path) -> None:
        """Fill inputs, outputs, max_batch_size, platform/backend from the ONNX file."""
        ac.autocomplete(config, _resolve_model_file(model_path))

    def __init__(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> None:
        self.name = config.name
        path = _resolve_model_file(model_path)
        plan = plan_session(config, instance)
        try:
            session = ort.InferenceSession(
                str(path),
                plan.options,
                providers=plan.providers,
                provider_options=plan.provider_options,
            )
        except Exception as exc:
            raise ModelLoadError(
                f"model '{self.name}': onnxruntime cannot load {path}: {exc}"
            ) from exc
        wanted = plan.providers[0]
        if wanted != CPU and wanted not in session.get_providers():
            raise ModelLoadError(
                f"model '{self.name}': onnxruntime could not start the {wanted} it asks for "
                f"(it fell back to {session.get_providers()}); check the GPU drivers and "
                "libraries, or use KIND_CPU"
            )
        inputs, outputs = ac.describe(session)
        _check_io(config, inputs, outputs, path)
        self._session: Any = session
        self._run_options: Any = None
        if plan.run_config:
            self._run_options = ort.RunOptions()
            for key, value in plan.run_config.items():
                self._run_options.add_run_config_entry(key, value)
        self._output_names = [t.name for t in outputs]
        self._text_inputs = frozenset(t.name for t in inputs if t.onnx_type == _ONNX_STRING)
        self._text_outputs = frozenset(t.name for t in outputs if t.onnx_type == _ONNX_STRING)
        logger.info(
            "loaded model '%s' instance %s from %s on %s",
            self.name,
            instance.name,
            path,
            session.get_providers(),
        )

    @property
    def session(self) -> Any:
        """The onnxruntime InferenceSession (for introspection: options, providers, metadata)."""
        if self._session is None:
            raise Unavailable(f"model '{self.name}' instance is unloaded")
        return self._session

    def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        session = self._session
        if session is None:
            raise Unavailable(f"model '{self.name}' instance is unloaded")
        feed = inputs if type(inputs) is dict else dict(inputs)
        if self._text_inputs:
            feed = {
                name: _to_text(name, array) if name in self._text_inputs else array
                for name, array in feed.items()
            }
        names = list(outputs) if outputs else self._output_names
        try:
            results = session.run(names, feed, self._run_options)
        except _ORT_INVALID_ARGUMENT as exc:
            raise InvalidArgument(
                f"model '{self.name}': onnxruntime rejected the inputs: {_ort_reason(exc)}"
            ) from exc
        except _ORT_FAILURES as exc:
            # The model ran and failed on these values (e.g. a Cast of a string that is not a
            # number): say what onnxruntime said, not only "internal error".
            raise InternalError(
                f"model '{self.name}' failed while running: {_ort_reason(exc)}"
            ) from exc
        produced = dict(zip(names, results, strict=True))
        if self._text_outputs:
            for name in self._text_outputs.intersection(names):
                produced[name] = _to_bytes(produced[name])
        return produced

    def unload(self) -> None:
        self._session = None
        self._run_options = None


_ORT_INVALID_ARGUMENT = ort_state.InvalidArgument
_ORT_FAILURES = (ort_state.RuntimeException, ort_state.Fail, ort_state.EPFail)


def _ort_reason(exc: Exception) -> str:
    """onnxruntime's status message without its "[ONNXRuntimeError] : 6 : CODE :" prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.rsplit(" : ", 1)[-1] if text.startswith("[ONNXRuntimeError]") else text


def _expected_shape(io: Any, batching: bool) -> list[int]:
    return ([-1] if batching else []) + list(io.dims)


def _check_tensor(
    model: str, kind: str, io: Any, tensor: ac.ModelTensor, batching: bool, path: Path
) -> None:
    """The config's view of one tensor must agree with the ONNX file's."""
    if io.data_type != mc.TYPE_INVALID and io.data_type != tensor.data_type:
        raise ModelLoadError(
            f"model '{model}': config gives {kind} '{io.name}' data_type "
            f"{mc.DataType.Name(io.data_type)} but {path.name} declares {tensor.onnx_type}; "
            f"write data_type: {mc.DataType.Name(tensor.data_type)}"
        )
    if batching and not tensor.batchable:
        raise ModelLoadError(
            f"model '{model}': max_batch_size > 0 needs a dynamic first dimension, but {kind} "
            f"'{io.name}' has shape {list(tensor.shape)} in {path.name}; set max_batch_size: 0 "
            "and give the full dims"
        )
    if io.HasField("reshape") or not tensor.shape:
        return
    expected = _expected_shape(io, batching)
    actual = tensor.dims(batching=False)
    compatible = len(expected) == len(actual) and all(
        e == a or e == -1 or a == -1 for e, a in zip(expected, actual, strict=True)
    )
    if not compatible:
        wanted = actual[1:] if batching else actual
        raise ModelLoadError(
            f"model '{model}': config dims {list(io.dims)} of {kind} '{io.name}' do not match "
            f"shape {list(tensor.shape)} in {path.name} (max_batch_size "
            f"{'> 0 adds' if batching else '0 adds no'} a batch dimension); write dims: {wanted}"
        )


def _check_io(
    config: mc.ModelConfig,
    inputs: Sequence[ac.ModelTensor],
    outputs: Sequence[ac.ModelTensor],
    path: Path,
) -> None:
    """Every model input is in the config, every config tensor in the model, and they agree."""
    model = config.name
    batching = config.max_batch_size > 0
    for kind, declared, actual in (
        ("input", config.input, inputs),
        ("output", config.output, outputs),
    ):
        by_name = {t.name: t for t in actual}
        for io in declared:
            tensor = by_name.get(io.name)
            if tensor is None:
                raise ModelLoadError(
                    f"model '{model}': config {kind} '{io.name}' is not an {kind} of {path.name}, "
                    f"whose {kind}s are {sorted(by_name)}"
                )
            if tensor.data_type == mc.TYPE_BF16:
                raise ModelLoadError(
                    f"model '{model}': {kind} '{io.name}' is bfloat16, which the onnxruntime "
                    "service cannot exchange yet; export the model with float16 or float32 I/O"
                )
            _check_tensor(model, kind, io, tensor, batching, path)
    missing = sorted({t.name for t in inputs} - {io.name for io in config.input})
    if missing:
        raise ModelLoadError(
            f"model '{model}': {path.name} needs inputs {missing} that config.pbtxt does not "
            "declare; add them to 'input' (or remove 'input' to let auto-complete fill it)"
        )
