"""tritonserver's other start-up flags (services/core/server_flags.py): what each sets on a
service, the ones refused and the ones accepted with no effect, and that `meshserve up` passes
the mesh-wide ones to every service as given."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.__main__ import settings_from_args as control_plane_settings
from deploy.cli import build_parser, up_settings
from deploy.supervisor import control_plane_command, service_argv
from services.core.server_flags import (
    MESH_FLAGS,
    NO_EFFECT,
    REFUSED,
    parse_backend_config,
    triton_bool,
)
from services.core.settings import ServerSettings, settings_from_args


def _service(*flags: str) -> ServerSettings:
    return settings_from_args(["--model-repository", "/models", *flags], "svc", "onnx")


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("ON", True), ("1", True), ("False", False), ("off", False), ("0", False)],
)
def test_booleans_take_tritons_spellings(text: str, value: bool) -> None:
    assert triton_bool("--x", text) is value
    assert _service(f"--strict-readiness={text}").flags.strict_readiness is value


def test_a_bad_boolean_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _service("--exit-on-error=maybe")
    assert "--exit-on-error=maybe: give true or false" in capsys.readouterr().err


def test_defaults_are_unchanged_without_flags() -> None:
    s = _service()
    assert s.flags.log_settings == ()
    assert (s.flags.strict_readiness, s.flags.exit_on_error) == (False, False)
    assert (s.flags.model_load_thread_count, s.flags.model_load_retry_count) == (4, 0)
    assert s.flags.default_max_batch_size("onnxruntime") == 4
    assert (s.server_name, s.http_port, s.metrics_port) == ("meshserve", 8000, 8002)
    assert (s.rate_limit, s.rate_limit_resources) == ("off", ())


def test_honoured_flags_set_the_service() -> None:
    s = _service(
        "--log-verbose=2",
        "--log-info",
        "false",
        "--log-warning=true",
        "--log-format=ISO8601",
        "--log-file=/tmp/x.log",
        "--id=triton",
        "--strict-readiness",
        "--exit-on-error=on",
        "--model-load-thread-count=2",
        "--model-load-retry-count",
        "3",
        "--allow-http=false",
        "--allow-metrics=0",
        "--grpc-address=0.0.0.0",
        "--rate-limit=EXECUTION_COUNT",
        "--rate-limit-resource=R1:4",
        "--rate-limit-resource=R2:2:1",
    )
    other = settings_from_args(["--model-store=/other"], "svc")  # tritonserver's other name
    assert other.model_repository == Path("/other")
    assert dict(s.flags.log_settings) == {
        "log_verbose_level": 2,
        "log_info": False,
        "log_warning": True,
        "log_format": "ISO8601",
        "log_file": "/tmp/x.log",
    }
    assert s.server_name == "triton"
    assert (s.flags.strict_readiness, s.flags.exit_on_error) == (True, True)
    assert (s.flags.model_load_thread_count, s.flags.model_load_retry_count) == (2, 3)
    assert (s.http_port, s.metrics_port) == (-1, -1)
    assert s.flags.grpc_address == "0.0.0.0"
    assert s.rate_limit == "execution_count"
    assert s.rate_limit_resources == (("R1", 4, -1), ("R2", 2, 1))


def test_log_verbose_takes_a_level_or_a_boolean() -> None:
    assert dict(_service("--log-verbose=true").flags.log_settings) == {"log_verbose_level": 1}
    assert dict(_service("--log-verbose", "0").flags.log_settings) == {"log_verbose_level": 0}


def test_backend_config_default_max_batch_size_global_and_per_backend() -> None:
    s = _service(
        "--backend-config=default-max-batch-size=8",
        "--backend-config=tensorflow,default-max-batch-size=0",
        "--backend-config=python,shm-default-byte-size=1048576",
        "--backend-config=onnxruntime,enable-global-threadpool=1",
    )
    assert s.flags.default_max_batch_size("onnxruntime") == 8
    assert s.flags.default_max_batch_size("tensorflow") == 0
    # what a service would log as unused: its own backend's keys and global ones, not others'
    assert s.flags.unused_backend_config(["onnxruntime"]) == [
        "onnxruntime,enable-global-threadpool=1"
    ]
    assert s.flags.unused_backend_config(["python"]) == ["python,shm-default-byte-size=1048576"]
    assert parse_backend_config("onnxruntime,key=a,b") == ("onnxruntime", "key", "a,b")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--grpc-use-ssl"], "TLS is terminated at the gateway"),
        (["--grpc-use-ssl=1"], "TLS is terminated at the gateway"),
        (["--grpc-server-cert=/c.pem"], "TLS is terminated at the gateway"),
        (["--http-restricted-api=model-repository,k=v"], "does not restrict APIs"),
        (["--grpc-header-forward-pattern=.*"], "does not forward headers"),
        (["--allow-grpc=false"], "reaches every service over gRPC"),
        (["--allow-sagemaker=true"], "no SageMaker endpoint"),
        (["--model-namespacing=true"], "one folder"),
        (["--trace-file=/tmp/t.json"], "trace files (mode triton) are not written"),
        (["--trace-config", "triton,file=/tmp/t.json"], "mode=opentelemetry"),
        (["--trace-config", "level=TENSORS"], "never tensor contents"),
        (["--log-format=json"], "give default or ISO8601"),
        (["--log-verbose=-1"], "whole number >= 0"),
        (["--model-load-thread-count=0"], "whole number >= 1"),
        (["--backend-config=nonsense"], "<backend>,<key>=<value>"),
        (["--backend-config=default-max-batch-size=big"], "whole number >= 0"),
        (["--rate-limit=sometimes"], "give off or execution_count"),
        (["--rate-limit-resource=R:1"], "needs --rate-limit=execution_count"),
        (["--rate-limit=execution_count", "--rate-limit-resource=R"], "<name>:<count>"),
        (["--model-repository=/a"], "give one --model-repository"),
    ],
)
def test_refused_and_bad_values_stop_the_service_with_the_reason(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _service(*flags)
    assert message in capsys.readouterr().err


def test_refused_flags_turned_off_are_accepted() -> None:
    s = _service(
        "--grpc-use-ssl=false",
        "--allow-grpc=true",
        "--reuse-http-port=0",
        "--allow-vertex-ai=off",
        "--model-namespacing=false",
    )
    assert s.flags.no_effect == ()


def test_tuning_flags_have_no_effect_and_say_why() -> None:
    s = _service(
        "--pinned-memory-pool-byte-size=268435456",
        "--cuda-memory-pool-byte-size",
        "0:67108864",
        "--grpc-keepalive-time=7200000",
    )
    flags = [flag for flag, _ in s.flags.no_effect]
    assert flags == [
        "--pinned-memory-pool-byte-size",
        "--cuda-memory-pool-byte-size",
        "--grpc-keepalive-time",
    ]
    assert all(why for _, why in s.flags.no_effect)
    assert not set(NO_EFFECT) & set(REFUSED)


def test_up_hands_every_service_the_mesh_wide_flags_as_given(tmp_path: Path) -> None:
    given = [
        "--log-verbose=1",
        "--log-format",
        "ISO8601",
        "--strict-readiness",
        "--exit-on-error=true",
        "--model-load-thread-count=1",
        "--backend-config=default-max-batch-size=2",
        "--rate-limit=execution_count",
        "--rate-limit-resource=R:1",
        "--pinned-memory-pool-byte-size=1",
    ]
    args = build_parser().parse_args(["up", "--model-repository", str(tmp_path), *given])
    mesh = up_settings(args)
    argv = service_argv(mesh, "onnx")
    service = settings_from_args(argv[3:], "svc", "onnx")
    assert dict(service.flags.log_settings) == {"log_verbose_level": 1, "log_format": "ISO8601"}
    assert (service.flags.strict_readiness, service.flags.exit_on_error) == (True, True)
    assert service.flags.model_load_thread_count == 1
    assert service.flags.default_max_batch_size("onnxruntime") == 2
    assert service.rate_limit_resources == (("R", 1, -1),)
    assert [f for f, _ in service.flags.no_effect] == ["--pinned-memory-pool-byte-size"]
    # the gateway's ServerReady follows --strict-readiness too
    command = control_plane_command(mesh, fresh=True)
    assert control_plane_settings(command[3:]).strict_readiness is True
    assert control_plane_settings([]).strict_readiness is False


def test_up_refuses_a_bad_flag_before_starting(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["up", "--model-repository", str(tmp_path), "--http-restricted-api=model-repository:k=v"]
    )
    with pytest.raises(SystemExit, match="meshserve does not restrict APIs by header"):
        up_settings(args)


def test_up_keeps_per_service_flags_to_itself(tmp_path: Path) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):  # --id names one server; the mesh's services keep theirs
        parser.parse_args(["up", "--model-repository", str(tmp_path), "--id=x"])
    assert "--id" not in MESH_FLAGS
