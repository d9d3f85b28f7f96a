"""The ensemble examples (examples/build_ensemble.py) and the Python steps they run.

Every built config loads as the services load it; every step's tensors match its model's config;
the Python steps run in-process through PythonRuntime and are checked against numpy; and each
ensemble, walked step by step in-process (a reference, not the ensemble service), gives the
closed forms its docstring promises.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from examples.build_ensemble import ENSEMBLES, build_ensemble_repository, required_models
from examples.build_python import TOPK_LABELS_TXT
from examples.build_repository import CNN_LABELS
from protos.gen.inference import model_config_pb2 as mc
from services.core.config import apply_defaults, load_config_file, validate_config
from services.core.errors import InvalidArgument, ModelLoadError
from services.core.requests import Array, InferRequest
from services.core.runtime import InstanceSpec, Runtime
from services.onnx.runtime import OnnxRuntime
from services.python.runtime import PythonRuntime

CPU = InstanceSpec(name="m_0", kind=mc.ModelInstanceGroup.KIND_CPU)
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ensemble_models")
    build_ensemble_repository(root)
    return root


def load_config(repo: Path, name: str) -> mc.ModelConfig:
    """As the services read a model's config: parse, Triton's defaults, validate."""
    config = load_config_file(repo / name / "config.pbtxt")
    apply_defaults(config)
    validate_config(config, name)
    return config


def python_runtime(repo: Path, name: str, config: mc.ModelConfig | None = None) -> PythonRuntime:
    config = config if config is not None else load_config(repo, name)
    return PythonRuntime(config, repo / name / "1" / "model.py", CPU)


def encode(pixels: npt.NDArray[np.uint8], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def normalised(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """The preprocessing in numpy, for an RGB image already 64x64: scale, normalise, HWC → CHW."""
    scaled = rgb.astype(np.float32) / 255.0
    result: npt.NDArray[np.float32] = ((scaled - MEAN) / STD).transpose(2, 0, 1)
    return result


def random_rgb(seed: int, height: int = 64, width: int = 64) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def images(*blobs: bytes) -> npt.NDArray[np.object_]:
    return np.array([[blob] for blob in blobs], dtype=object)


# --- the configs ----------------------------------------------------------------------------


def test_every_built_config_loads_and_ensembles_have_a_version_dir(repo: Path) -> None:
    built = sorted(p.name for p in repo.iterdir())
    needed = required_models()
    assert built == sorted([*needed.ensembles, *needed.python, *needed.onnx])
    for name in built:
        config = load_config(repo, name)
        if name in ENSEMBLES:
            assert config.platform == "ensemble"
            assert (repo / name / "1").is_dir()


def test_required_models_follow_nested_ensembles() -> None:
    everything = required_models()
    assert set(everything.ensembles) == set(ENSEMBLES)
    assert set(everything.python) == {
        "preprocess_image_python",
        "topk_python",
        "slow_a_python",
        "slow_b_python",
        "repeat_count_python",
    }
    assert set(everything.onnx) == {"cnn", "simple"}
    nested = required_models(["nested_ensemble"])
    assert nested.ensembles == ("nested_ensemble", "chain3")
    assert (nested.python, nested.onnx) == ((), ("simple",))
    with pytest.raises(ValueError, match="unknown ensemble example"):
        required_models(["nope"])


def _spec(io: mc.ModelInput | mc.ModelOutput) -> tuple[str, list[int]]:
    return mc.DataType.Name(io.data_type), list(io.dims)


@pytest.mark.parametrize("name", sorted(ENSEMBLES))
def test_steps_match_their_models(repo: Path, name: str) -> None:
    """Walk the step DAG: each step's inputs exist with its model's datatype and dims, every
    tensor is produced once and used, every step runs and every ensemble output is produced."""
    config = load_config(repo, name)
    tensors = {i.name: _spec(i) for i in config.input}
    pending = list(config.ensemble_scheduling.step)
    while pending:
        ready = [s for s in pending if all(v in tensors for v in s.input_map.values())]
        assert ready, f"steps {[s.model_name for s in pending]} wait on tensors never produced"
        for step in ready:
            pending.remove(step)
            model = load_config(repo, step.model_name)
            assert 0 < config.max_batch_size <= model.max_batch_size
            model_inputs = {i.name: i for i in model.input}
            model_outputs = {o.name: o for o in model.output}
            required = {i.name for i in model.input if not i.optional}
            assert required <= set(step.input_map), f"{step.model_name} needs {required}"
            for key, tensor in step.input_map.items():
                assert tensors[tensor] == _spec(model_inputs[key]), (step.model_name, key)
            for key, tensor in step.output_map.items():
                assert tensor not in tensors, f"tensor {tensor} produced twice"
                tensors[tensor] = _spec(model_outputs[key])
    for output in config.output:
        assert tensors[output.name] == _spec(output)
    consumed = {v for s in config.ensemble_scheduling.step for v in s.input_map.values()}
    assert set(tensors) == consumed | {o.name for o in config.output}, "a tensor nobody uses"


def test_topk_labels_are_the_cnns(repo: Path) -> None:
    assert tuple(TOPK_LABELS_TXT.split()) == CNN_LABELS
    assert (repo / "topk_python" / "labels.txt").read_text() == (
        repo / "cnn" / "labels.txt"
    ).read_text()


# --- preprocess_image_python ----------------------------------------------------------------


def test_preprocess_normalises_like_numpy(repo: Path) -> None:
    runtime = python_runtime(repo, "preprocess_image_python")
    exact = random_rgb(1)
    rgba = np.dstack([random_rgb(2, 80, 100), np.full((80, 100), 255, np.uint8)])
    gray = random_rgb(3, 48, 48)[..., 0]
    batch = images(encode(exact), encode(rgba), encode(gray, "JPEG"))
    (out,) = runtime.infer_requests([InferRequest("p", "", {"IMAGE": batch})], ["PIXELS"])
    assert isinstance(out, dict)
    pixels = out["PIXELS"]
    assert pixels.shape == (3, 3, 64, 64) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[0], normalised(exact), rtol=1e-6, atol=1e-6)
    # resized images: Pillow's resize, then the same arithmetic
    for index, blob in ((1, batch[1, 0]), (2, batch[2, 0])):
        with Image.open(io.BytesIO(blob)) as image:
            rgb = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
        np.testing.assert_allclose(pixels[index], normalised(rgb), rtol=1e-6, atol=1e-6)
    runtime.unload()


def test_preprocess_rejects_bytes_that_are_not_an_image(repo: Path) -> None:
    runtime = python_runtime(repo, "preprocess_image_python")
    good = InferRequest("p", "", {"IMAGE": images(encode(random_rgb(4)))})
    junk = InferRequest("p", "", {"IMAGE": images(b"not an image")})
    truncated = InferRequest("p", "", {"IMAGE": images(encode(random_rgb(5))[:100])})
    ok, bad, cut = runtime.infer_requests([good, junk, truncated], ["PIXELS"])
    assert isinstance(ok, dict) and ok["PIXELS"].shape == (1, 3, 64, 64)
    assert isinstance(bad, InvalidArgument)
    assert bad.message == "IMAGE[0] (12 bytes) is not in an image format Pillow can read"
    assert isinstance(cut, InvalidArgument)
    assert cut.message.startswith("IMAGE[0] cannot be decoded as an image: ")
    runtime.unload()


def test_preprocess_without_pillow_says_which_extra(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)  # what `import PIL` sees when it is missing
    with pytest.raises(ModelLoadError, match=r"install the extra: pip install '\.\[python\]'"):
        python_runtime(repo, "preprocess_image_python")


# --- topk_python ----------------------------------------------------------------------------


def test_topk_gives_the_likeliest_labels_in_order(repo: Path) -> None:
    runtime = python_runtime(repo, "topk_python")
    scores = np.zeros((2, 10), dtype=np.float32)
    scores[0, [3, 8, 0]] = [5.0, 4.0, 3.0]  # cat, ship, airplane; the rest tie at 0
    out = runtime.infer({"SCORES": scores}, ["LABELS", "PROBS"])
    assert out["LABELS"].tolist() == [
        [b"cat", b"ship", b"airplane"],
        [b"airplane", b"automobile", b"bird"],  # all equal: lower index first
    ]
    probs = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    assert out["PROBS"].dtype == np.float32
    np.testing.assert_allclose(out["PROBS"][0], probs[0, [3, 8, 0]], rtol=1e-6)
    np.testing.assert_allclose(out["PROBS"][1], [0.1, 0.1, 0.1], rtol=1e-6)
    (wrong,) = runtime.infer_requests(
        [InferRequest("t", "", {"SCORES": np.zeros((1, 7), np.float32)})], ["LABELS"]
    )
    assert isinstance(wrong, InvalidArgument) and "SCORES has 7 classes" in wrong.message
    runtime.unload()


def test_topk_k_is_a_config_parameter_matching_the_dims(repo: Path) -> None:
    config = load_config(repo, "topk_python")
    config.parameters["top_k"].string_value = "5"
    with pytest.raises(ModelLoadError, match=r"top_k is 5; set dims: \[ 5 \]"):
        python_runtime(repo, "topk_python", config)
    for output in config.output:
        output.dims[:] = [5]
    runtime = python_runtime(repo, "topk_python", config)
    scores = np.arange(10, dtype=np.float32)[None]
    out = runtime.infer({"SCORES": scores}, ["LABELS"])
    assert out["LABELS"].tolist() == [[b"truck", b"ship", b"horse", b"frog", b"dog"]]
    runtime.unload()


# --- the ensembles, walked in-process -------------------------------------------------------


class StepRunner:
    """Runs a model of the built repository in-process; an ensemble by walking its steps in
    order (the reference the closed forms are checked with, not services/ensemble). The slow
    models run with delay_ms 0."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.runtimes: dict[str, Runtime] = {}

    def runtime(self, name: str, config: mc.ModelConfig) -> Runtime:
        if name not in self.runtimes:
            if config.backend == "python":
                if "delay_ms" in config.parameters:
                    config.parameters["delay_ms"].string_value = "0"
                self.runtimes[name] = python_runtime(self.repo, name, config)
            else:
                path = self.repo / name / "1" / "model.onnx"
                self.runtimes[name] = OnnxRuntime(config, path, CPU)
        return self.runtimes[name]

    def run(self, name: str, inputs: Mapping[str, Array]) -> dict[str, Array]:
        config = load_config(self.repo, name)
        outputs = [o.name for o in config.output]
        if config.platform != "ensemble":
            return self.runtime(name, config).infer(inputs, outputs)
        tensors = dict(inputs)
        for step in config.ensemble_scheduling.step:  # the examples list steps in order
            step_inputs = {key: tensors[value] for key, value in step.input_map.items()}
            produced = self.run(step.model_name, step_inputs)
            tensors.update({value: produced[key] for key, value in step.output_map.items()})
        return {name: tensors[name] for name in outputs}

    def close(self) -> None:
        for runtime in self.runtimes.values():
            runtime.unload()


@pytest.fixture(scope="module")
def runner(repo: Path) -> Iterator[StepRunner]:
    runner = StepRunner(repo)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def pair() -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    rng = np.random.default_rng(7)
    a = rng.integers(-1000, 1000, (3, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, (3, 16), dtype=np.int32)
    return a, b


@pytest.mark.parametrize(
    ("name", "output0", "output1"),
    [
        ("chain3", lambda a, b: 2 * (a + b), lambda a, b: 2 * (a - b)),
        ("nested_ensemble", lambda a, b: 4 * a, lambda a, b: 4 * b),
        ("parallel_branches", lambda x, _: 2 * x, lambda x, _: x + 1),
        ("branch_join", lambda x, _: 3 * x + 1, lambda x, _: x - 1),
    ],
)
def test_integer_ensembles_closed_forms(
    runner: StepRunner,
    pair: tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]],
    name: str,
    output0: Callable[[Array, Array], Array],
    output1: Callable[[Array, Array], Array],
) -> None:
    a, b = pair
    inputs = {"INPUT0": a, "INPUT1": b} if len(ENSEMBLES[name].inputs) == 2 else {"INPUT0": a}
    out = runner.run(name, inputs)
    np.testing.assert_array_equal(out["OUTPUT0"], output0(a, b))
    np.testing.assert_array_equal(out["OUTPUT1"], output1(a, b))
    assert out["OUTPUT0"].dtype == out["OUTPUT1"].dtype == np.int32


def test_image_classifier_agrees_with_cnn_on_numpy_preprocessing(runner: StepRunner) -> None:
    rgb = [random_rgb(seed) for seed in (10, 11)]
    out = runner.run("image_classifier", {"IMAGE": images(*(encode(x) for x in rgb))})
    cnn = runner.runtime("cnn", load_config(runner.repo, "cnn"))
    scores = cnn.infer({"INPUT0": np.stack([normalised(x) for x in rgb])}, ["OUTPUT0"])["OUTPUT0"]
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    assert out["LABELS"].tolist() == [[CNN_LABELS[i].encode() for i in row] for row in top]
    np.testing.assert_allclose(out["PROBS"], np.take_along_axis(probs, top, axis=1), rtol=1e-4)
