"""Model control through tritonclient: explicit load/unload (with a config override), poll mode
following the repository while serving, and system shared memory."""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.support import ServerThread, settings_for


def simple_inputs(value: int = 1) -> list[grpcclient.InferInput]:
    out = []
    for n in ("INPUT0", "INPUT1"):
        i = grpcclient.InferInput(n, [1, 16], "INT32")
        i.set_data_from_numpy(np.full((1, 16), value, np.int32))
        out.append(i)
    return out


def wait_for(predicate: object, timeout: float = 20) -> bool:
    """Bounded wait for a condition that a background poll makes true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_explicit_load_unload_and_override(repo_copy: Path) -> None:
    from services.onnx.runtime import OnnxRuntime

    with ServerThread(
        settings_for(repo_copy, model_control_mode="explicit", startup_models=("simple",)),
        [OnnxRuntime],
    ) as srv:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            assert c.is_model_ready("simple")
            assert not c.is_model_ready("mlp")
            index = {m["name"]: m for m in c.get_model_repository_index(as_json=True)["models"]}
            assert "mlp" in index and index["mlp"].get("state", "") != "READY"

            c.load_model("mlp")
            assert c.is_model_ready("mlp")
            c.unload_model("mlp")
            assert not c.is_model_ready("mlp")
            with pytest.raises(InferenceServerException) as info:
                c.infer("mlp", [])
            assert info.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND")

            # config override in the load request: change max_batch_size of simple to 2
            config = c.get_model_config("simple", as_json=True)["config"]
            config["max_batch_size"] = 2
            config.pop("dynamic_batching", None)
            c.load_model("simple", config=json.dumps(config))
            assert c.get_model_config("simple", as_json=True)["config"]["max_batch_size"] == 2
            with pytest.raises(InferenceServerException) as info:
                big = [grpcclient.InferInput(n, [4, 16], "INT32") for n in ("INPUT0", "INPUT1")]
                for b in big:
                    b.set_data_from_numpy(np.ones((4, 16), np.int32))
                c.infer("simple", big)
            assert "max_batch_size" in info.value.message()
            assert c.infer("simple", simple_inputs(2)).as_numpy("OUTPUT0")[0, 0] == 4

            with pytest.raises(InferenceServerException) as info:
                c.load_model("not_in_repository")
            assert "not_in_repository" in info.value.message()
            with pytest.raises(InferenceServerException) as info:
                c.load_model("simple", config="{not json")
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert c.is_model_ready("simple")
        finally:
            c.close()


def test_poll_mode_follows_versions(repo_copy: Path) -> None:
    from services.onnx.runtime import OnnxRuntime

    with ServerThread(
        settings_for(repo_copy, model_control_mode="poll", repository_poll_secs=0.2), [OnnxRuntime]
    ) as srv:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            assert c.get_model_metadata("simple", as_json=True)["versions"] == ["1"]
            # add version 2: the default policy (latest 1) serves 2 and retires 1
            shutil.copytree(repo_copy / "simple" / "1", repo_copy / "simple" / "2")
            assert wait_for(lambda: c.is_model_ready("simple", "2"))
            assert wait_for(lambda: not c.is_model_ready("simple", "1"))
            assert c.infer("simple", simple_inputs()).get_response().model_version == "2"
            # serve all versions: config change is picked up
            cfg = (repo_copy / "simple" / "config.pbtxt").read_text()
            (repo_copy / "simple" / "config.pbtxt").write_text(
                cfg + "\nversion_policy: { all { } }\n"
            )
            assert wait_for(
                lambda: c.is_model_ready("simple", "1") and c.is_model_ready("simple", "2")
            )
            # remove version 2
            shutil.rmtree(repo_copy / "simple" / "2")
            assert wait_for(lambda: not c.is_model_ready("simple", "2"))
            assert c.is_model_ready("simple", "1")
            # a new model appears, a model disappears
            shutil.copytree(repo_copy / "simple", repo_copy / "simple_copy")
            cfg = (
                (repo_copy / "simple_copy" / "config.pbtxt")
                .read_text()
                .replace('"simple"', '"simple_copy"')
            )
            (repo_copy / "simple_copy" / "config.pbtxt").write_text(cfg)
            assert wait_for(lambda: c.is_model_ready("simple_copy"))
            shutil.rmtree(repo_copy / "mlp")
            assert wait_for(lambda: not c.is_model_ready("mlp"))
            assert c.infer("simple", simple_inputs()).as_numpy("OUTPUT0")[0, 0] == 2
        finally:
            c.close()


def test_system_shared_memory(onnx_server: ServerThread) -> None:
    c = grpcclient.InferenceServerClient(onnx_server.grpc_url)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 5, np.int32)
    size = a.nbytes
    in_handle = shm.create_shared_memory_region("in_region", "/meshserve_test_in", size * 2)
    out_handle = shm.create_shared_memory_region("out_region", "/meshserve_test_out", size * 2)
    try:
        shm.set_shared_memory_region(in_handle, [a, b])
        c.register_system_shared_memory("in_region", "/meshserve_test_in", size * 2)
        c.register_system_shared_memory("out_region", "/meshserve_test_out", size * 2)
        status = c.get_system_shared_memory_status(as_json=True)["regions"]
        assert {"in_region", "out_region"} <= set(status)
        inputs = [
            grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
            grpcclient.InferInput("INPUT1", [1, 16], "INT32"),
        ]
        inputs[0].set_shared_memory("in_region", size, 0)
        inputs[1].set_shared_memory("in_region", size, size)
        outputs = [
            grpcclient.InferRequestedOutput("OUTPUT0"),
            grpcclient.InferRequestedOutput("OUTPUT1"),
        ]
        outputs[0].set_shared_memory("out_region", size, 0)
        outputs[1].set_shared_memory("out_region", size, size)
        result = c.infer("simple", inputs, outputs=outputs)
        out0 = result.get_output("OUTPUT0")
        assert out0 is not None
        got0 = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=0)
        got1 = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=size)
        np.testing.assert_array_equal(got0, a + b)
        np.testing.assert_array_equal(got1, a - b)

        # an input read past the region's end is refused naming the input
        inputs[1].set_shared_memory("in_region", size, size + 4)
        with pytest.raises(InferenceServerException) as info:
            c.infer("simple", inputs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert info.value.message().startswith(
            f"input 'INPUT1' needs {size} bytes but region 'in_region' has {size - 4} from offset"
        )
        with pytest.raises(InferenceServerException) as info:
            c.register_system_shared_memory("in_region", "/meshserve_test_in", size)
        assert "in_region" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            c.register_system_shared_memory("nokey", "/meshserve_no_such_key", size)
        assert info.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as info:
            c.register_cuda_shared_memory("gpu", base64.b64encode(b"handle"), 0, 16)
        assert "GPU" in info.value.message()
    finally:
        c.unregister_system_shared_memory()
        assert c.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
        c.close()


SLOW = """
name: "slow"
platform: "onnxruntime_onnx"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 600000 preferred_batch_size: [ 8 ] }
"""


def test_reload_and_unload_lose_nothing_in_flight(repo_copy: Path) -> None:
    """Requests waiting in the queue when their model is reloaded or unloaded still complete."""
    import threading

    from services.onnx.runtime import OnnxRuntime

    shutil.copytree(repo_copy / "simple", repo_copy / "slow")
    (repo_copy / "slow" / "config.pbtxt").write_text(SLOW)
    with ServerThread(
        settings_for(repo_copy, model_control_mode="explicit", startup_models=("slow",)),
        [OnnxRuntime],
    ) as srv:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            for action in ("reload", "unload"):
                results: list[int] = []
                errors: list[BaseException] = []

                def one(
                    value: int, results: list[int] = results, errors: list[BaseException] = errors
                ) -> None:
                    client = grpcclient.InferenceServerClient(srv.grpc_url)
                    try:
                        results.append(
                            int(
                                client.infer("slow", simple_inputs(value)).as_numpy("OUTPUT0")[0, 0]
                            )
                        )
                    except BaseException as exc:
                        errors.append(exc)
                    finally:
                        client.close()

                threads = [threading.Thread(target=one, args=(v,)) for v in (1, 2, 3)]
                for t in threads:
                    t.start()
                assert wait_for(
                    lambda: (
                        srv.running is not None
                        and srv.running.manager.get("slow", "").batcher.pending == 3
                    )
                )
                if action == "reload":
                    config = c.get_model_config("slow", as_json=True)["config"]
                    config["dynamic_batching"]["max_queue_delay_microseconds"] = 700000
                    c.load_model("slow", config=json.dumps(config))
                else:
                    c.unload_model("slow")
                for t in threads:
                    t.join(30)
                assert not errors, errors
                assert sorted(results) == [2, 4, 6]
                if action == "reload":
                    reloaded = c.get_model_config("slow", as_json=True)["config"]
                    assert (
                        int(reloaded["dynamic_batching"]["max_queue_delay_microseconds"]) == 700000
                    )
            assert not c.is_model_ready("slow")
        finally:
            c.close()


def test_gateway_version_header_picks_the_version(repo_copy: Path) -> None:
    """The gateway names the version its split chose in `meshserve-version`; the body wins."""
    import tritonclient.http as httpclient

    from services.onnx.runtime import OnnxRuntime

    shutil.copytree(repo_copy / "simple" / "1", repo_copy / "simple" / "2")
    cfg = (repo_copy / "simple" / "config.pbtxt").read_text()
    (repo_copy / "simple" / "config.pbtxt").write_text(cfg + "\nversion_policy: { all { } }\n")
    with ServerThread(settings_for(repo_copy), [OnnxRuntime]) as srv:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        h = httpclient.InferenceServerClient(srv.http_url)
        try:
            no_header = c.infer("simple", simple_inputs()).get_response().model_version
            assert no_header == "2"  # highest ready version
            routed = c.infer("simple", simple_inputs(), headers={"meshserve-version": "1"})
            assert routed.get_response().model_version == "1"
            explicit = c.infer(
                "simple", simple_inputs(), model_version="2", headers={"meshserve-version": "1"}
            )
            assert explicit.get_response().model_version == "2"
            assert c.get_model_metadata("simple", headers={"meshserve-version": "1"}).versions == [
                "1",
                "2",
            ]
            ins = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
            for i in ins:
                i.set_data_from_numpy(np.ones((1, 16), np.int32))
            assert (
                h.infer("simple", ins, headers={"meshserve-version": "1"}).get_response()[
                    "model_version"
                ]
                == "1"
            )
            assert h.infer("simple", ins).get_response()["model_version"] == "2"
        finally:
            c.close()
            h.close()
