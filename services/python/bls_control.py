"""Triton's BLS model loading API: ``pb_utils.load_model``, ``unload_model``, ``is_model_ready``.

A Python model (in ``initialize`` or ``execute``) loads, unloads and checks other models of the
mesh. Each call is the matching RPC (RepositoryModelLoad, RepositoryModelUnload, ModelReady) sent
to the gateway (``MESHSERVE_GATEWAY``, services/core/gateway_client.py), whose front forwards it
to the services that own the model, as it does for a client; so the mesh must run in
``explicit`` model control mode for loads and unloads, as Triton requires.

As in Triton, ``load_model`` and ``unload_model`` raise ``pb_utils.TritonModelException`` with
the server's reason when they fail; ``is_model_ready`` answers False for a model it cannot
find. ``load_model(config=...)`` takes the config as a JSON string and ``files`` maps
``"file:<version>/<name>"`` to the file's bytes (the load request's override parameters).
Calls block the model's thread; each one marks the model as calling others (services/python/
bls.py), so its later batches run on worker threads.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from protos.gen.inference import grpc_service_pb2 as pb
from services.python import bls
from services.python import triton_python_backend_utils as pb_utils

#: how long a load may take (a model's load includes its warm-up)
LOAD_TIMEOUT_S = 600.0
#: unload and readiness checks
CONTROL_TIMEOUT_S = 60.0


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    """Whether the mesh serves ``model_name`` (``model_version``: that version; "": any)."""
    bls.current_caller().calling()
    request = pb.ModelReadyRequest(name=model_name, version=str(model_version or ""))
    try:
        return bool(bls.stub().ModelReady(request, timeout=CONTROL_TIMEOUT_S).ready)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise _failed("is_model_ready", model_name, exc) from None


def load_model(model_name: str, config: str = "", files: Mapping[str, bytes] | None = None) -> None:
    """Load (or reload) ``model_name``, with ``config`` (JSON) and ``files`` overriding the
    repository's when given."""
    bls.current_caller().calling()
    request = pb.RepositoryModelLoadRequest(model_name=model_name)
    if config:
        request.parameters["config"].string_param = config
    for key, content in (files or {}).items():
        if not key.startswith("file:"):
            raise pb_utils.TritonModelException(
                f"load_model: file key {key!r} must be 'file:<version>/<name>'"
            )
        request.parameters[key].bytes_param = bytes(content)
    try:
        bls.stub().RepositoryModelLoad(request, timeout=LOAD_TIMEOUT_S)
    except grpc.RpcError as exc:
        raise _failed("load_model", model_name, exc) from None


def unload_model(model_name: str, unload_dependents: bool = False) -> None:
    """Unload every version of ``model_name``."""
    bls.current_caller().calling()
    request = pb.RepositoryModelUnloadRequest(model_name=model_name)
    if unload_dependents:
        request.parameters["unload_dependents"].bool_param = True
    try:
        bls.stub().RepositoryModelUnload(request, timeout=CONTROL_TIMEOUT_S)
    except grpc.RpcError as exc:
        raise _failed("unload_model", model_name, exc) from None


def _failed(call: str, model_name: str, exc: grpc.RpcError) -> pb_utils.TritonModelException:
    return pb_utils.TritonModelException(
        f"{call}('{model_name}') failed: {exc.code().name}: {exc.details()}"
    )
