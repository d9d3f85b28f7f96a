"""Build the example model repository from code: the start of every demo, test and benchmark.

``python -m examples.build_repository <dir>`` writes a Triton-layout repository
(``<dir>/<model>/config.pbtxt`` + ``<dir>/<model>/1/model.onnx``) holding the models a Triton
user knows from its quick-start (``simple``, ``simple_string``, ``simple_identity``, the stateful
``simple_sequence``), ``simple_ragged`` (ragged batching), two
compute-bound ones for benchmarks (``mlp``, ``cnn``) and ``dtypes_onnx``, an identity per
datatype for the conformance suite (``IN_<DTYPE>`` → ``OUT_<DTYPE>``, every Triton datatype
but BF16, see DTYPES_DATATYPES). Nothing is downloaded: graphs are built
with ``onnx.helper`` and weights drawn from a fixed seed, so two builds give the same bytes.
The model service then loads the repository like any user's (services/core → services/onnx).
Unless ``--onnx-only`` or ``--model`` is given, the other families' examples follow: the
Python-backend ones and the ensembles (examples/build_python.py, examples/build_ensemble.py),
then PyTorch and TensorFlow where installed.

Rebuilding is idempotent: a file whose bytes would not change is left untouched (mtime too),
a changed one is replaced atomically, and other files in the directory are left alone.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from examples.build_ragged import build_simple_ragged
from examples.build_sequence import build_simple_sequence
from examples.cli import builder_parser, config_type, write_if_changed
from examples.onnx_convnet import ConvNet, he_weights, initializer
from examples.onnx_graph import BATCH, ExampleModel, finish_model, value_info

SEED = 20261121

CNN_LABELS = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def _add_sub_nodes(a: str, b: str, out_sum: str, out_diff: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Add", [a, b], [out_sum], name="add"),
        helper.make_node("Sub", [a, b], [out_diff], name="sub"),
    ]


def _io_block(kind: str, type_name: str, dims: str, count: int) -> str:
    entries = ",\n".join(
        f'  {{\n    name: "{kind.upper()}{i}"\n    data_type: {type_name}\n'
        f"    dims: [ {dims} ]\n  }}"
        for i in range(count)
    )
    return f"{kind} [\n{entries}\n]\n"


def _simple_config(name: str, type_name: str) -> str:
    return (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 8\n'
        + _io_block("input", type_name, "16", 2)
        + _io_block("output", type_name, "16", 2)
        + "dynamic_batching { }\n"
    )


def build_simple() -> ExampleModel:
    """INT32 [16] pair → their sum and difference (Triton's ``simple``)."""
    shape: list[int | str] = [BATCH, 16]
    graph = helper.make_graph(
        _add_sub_nodes("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1"),
        "simple",
        [
            value_info("INPUT0", TensorProto.INT32, shape),
            value_info("INPUT1", TensorProto.INT32, shape),
        ],
        [
            value_info("OUTPUT0", TensorProto.INT32, shape),
            value_info("OUTPUT1", TensorProto.INT32, shape),
        ],
    )
    return ExampleModel(_simple_config("simple", "TYPE_INT32"), finish_model(graph), {})


def build_simple_string() -> ExampleModel:
    """Decimal numbers as strings → sum and difference as strings (Triton's ``simple_string``)."""
    shape: list[int | str] = [BATCH, 16]
    to_int = TensorProto.INT32
    to_str = TensorProto.STRING
    nodes = [
        helper.make_node("Cast", ["INPUT0"], ["a"], to=to_int, name="parse0"),
        helper.make_node("Cast", ["INPUT1"], ["b"], to=to_int, name="parse1"),
        *_add_sub_nodes("a", "b", "sum", "diff"),
        helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=to_str, name="format0"),
        helper.make_node("Cast", ["diff"], ["OUTPUT1"], to=to_str, name="format1"),
    ]
    graph = helper.make_graph(
        nodes,
        "simple_string",
        [value_info("INPUT0", to_str, shape), value_info("INPUT1", to_str, shape)],
        [value_info("OUTPUT0", to_str, shape), value_info("OUTPUT1", to_str, shape)],
    )
    return ExampleModel(_simple_config("simple_string", "TYPE_STRING"), finish_model(graph), {})


def build_simple_identity() -> ExampleModel:
    """BYTES tensor of any length returned unchanged (Triton's ``simple_identity``)."""
    shape: list[int | str] = [BATCH, "length"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"], name="identity")],
        "simple_identity",
        [value_info("INPUT0", TensorProto.STRING, shape)],
        [value_info("OUTPUT0", TensorProto.STRING, shape)],
    )
    config = (
        'name: "simple_identity"\nbackend: "onnxruntime"\nmax_batch_size: 8\n'
        + _io_block("input", "TYPE_STRING", "-1", 1)
        + _io_block("output", "TYPE_STRING", "-1", 1)
    )
    return ExampleModel(config, finish_model(graph), {})


#: Triton datatype → ONNX element type, for every datatype the ONNX service exchanges
ONNX_TYPES: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}
#: the datatypes of ``dtypes_onnx``: not BF16, which onnxruntime's Python API cannot hand over
#: (it has no numpy type for bfloat16), so services/onnx refuses bfloat16 model I/O at load
DTYPES_DATATYPES = tuple(ONNX_TYPES)


def _named_io_block(kind: str, tensors: Sequence[tuple[str, str]], dims: str) -> str:
    """A config ``input``/``output`` list of (name, data_type) entries, all with ``dims``."""
    entries = ",\n".join(
        f'  {{\n    name: "{name}"\n    data_type: {type_name}\n    dims: [ {dims} ]\n  }}'
        for name, type_name in tensors
    )
    return f"{kind} [\n{entries}\n]\n"


def build_dtypes() -> ExampleModel:
    """One Identity per datatype: IN_<DTYPE> [-1] → OUT_<DTYPE>, batched (max_batch_size 8)."""
    nodes: list[onnx.NodeProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    for datatype in DTYPES_DATATYPES:
        shape: list[int | str] = [BATCH, f"n_{datatype.lower()}"]
        nodes.append(
            helper.make_node("Identity", [f"IN_{datatype}"], [f"OUT_{datatype}"], name=datatype)
        )
        inputs.append(value_info(f"IN_{datatype}", ONNX_TYPES[datatype], shape))
        outputs.append(value_info(f"OUT_{datatype}", ONNX_TYPES[datatype], shape))
    graph = helper.make_graph(nodes, "dtypes_onnx", inputs, outputs)
    config = (
        'name: "dtypes_onnx"\nbackend: "onnxruntime"\nmax_batch_size: 8\n'
        + _named_io_block("input", [(f"IN_{d}", config_type(d)) for d in DTYPES_DATATYPES], "-1")
        + _named_io_block("output", [(f"OUT_{d}", config_type(d)) for d in DTYPES_DATATYPES], "-1")
        + "dynamic_batching { }\n"
    )
    return ExampleModel(config, finish_model(graph), {})


def _batched_config(
    name: str,
    input_dims: Sequence[int],
    max_batch: int,
    delay_us: int,
    label_filename: str = "",
    parameters: Mapping[str, str] | None = None,
) -> str:
    dims = ", ".join(str(d) for d in input_dims)
    labels = f'    label_filename: "{label_filename}"\n' if label_filename else ""
    params = "".join(
        f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'
        for key, value in (parameters or {}).items()
    )
    return (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch}\n'
        f'input [\n  {{\n    name: "INPUT0"\n    data_type: TYPE_FP32\n    dims: [ {dims} ]\n'
        "  }\n]\n"
        'output [\n  {\n    name: "OUTPUT0"\n    data_type: TYPE_FP32\n    dims: [ 10 ]\n'
        f"{labels}  }}\n]\n"
        "instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {delay_us}\n}}\n"
        f"{params}"
    )


def build_mlp(seed: int = SEED) -> ExampleModel:
    """FP32 [256] → 1024 → 1024 → 10: three dense layers, ReLU between."""
    rng = np.random.default_rng(seed)
    widths = [256, 1024, 1024, 10]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "INPUT0"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        last = i == len(widths) - 2
        out = "OUTPUT0" if last else f"fc{i}"
        inits += [
            initializer(f"fc{i}.weight", he_weights(rng, (fan_out, fan_in), fan_in)),
            initializer(f"fc{i}.bias", np.zeros(fan_out, dtype=np.float32)),
        ]
        nodes.append(
            helper.make_node(
                "Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [out], transB=1, name=f"fc{i}"
            )
        )
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [value_info("INPUT0", TensorProto.FLOAT, [BATCH, 256])],
        [value_info("OUTPUT0", TensorProto.FLOAT, [BATCH, 10])],
        initializer=inits,
    )
    # Tuned for latency on a small machine (benchmarks/README.md): one onnxruntime thread (a
    # batch-1 run is memory-bound; a second thread mostly costs a wake-up) and no batching delay
    # (under load batches still form from the requests that queue while one runs).
    config = _batched_config("mlp", [256], 64, 0, parameters={"intra_op_thread_count": "1"})
    return ExampleModel(config, finish_model(graph), {})


def build_cnn(seed: int = SEED + 1) -> ExampleModel:
    """FP32 [3, 64, 64] image → 10 class scores: a small ResNet (stem, 4 stages x 2 blocks)."""
    net = ConvNet(np.random.default_rng(seed))
    x = net.relu(net.conv_bn("INPUT0", "stem", 3, 32, 3, 2))
    stages = [(32, 1), (64, 2), (128, 2), (256, 2)]
    c_in = 32
    for s, (c_out, stride) in enumerate(stages):
        x = net.basic_block(x, f"layer{s + 1}.0", c_in, c_out, stride)
        x = net.basic_block(x, f"layer{s + 1}.1", c_out, c_out, 1)
        c_in = c_out
    net.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["OUTPUT0"], transB=1),
    ]
    net.inits += [
        initializer("fc.weight", he_weights(net.rng, (10, c_in), c_in)),
        initializer("fc.bias", np.zeros(10, dtype=np.float32)),
    ]
    graph = helper.make_graph(
        net.nodes,
        "cnn",
        [value_info("INPUT0", TensorProto.FLOAT, [BATCH, 3, 64, 64])],
        [value_info("OUTPUT0", TensorProto.FLOAT, [BATCH, 10])],
        initializer=net.inits,
    )
    config = _batched_config("cnn", [3, 64, 64], 64, 2000, label_filename="labels.txt")
    return ExampleModel(config, finish_model(graph), {"labels.txt": "\n".join(CNN_LABELS) + "\n"})


BUILDERS: dict[str, Callable[[], ExampleModel]] = {
    "simple": build_simple,
    "simple_string": build_simple_string,
    "simple_identity": build_simple_identity,
    "mlp": build_mlp,
    "cnn": build_cnn,
    "dtypes_onnx": build_dtypes,
    "simple_sequence": build_simple_sequence,
    "simple_ragged": build_simple_ragged,
}


def write_model(root: Path, name: str, example: ExampleModel) -> None:
    """Write one model directory: config.pbtxt, 1/model.onnx and extra files."""
    model_dir = root / name
    write_if_changed(model_dir / "config.pbtxt", example.config.encode())
    write_if_changed(model_dir / "1" / "model.onnx", example.model.SerializeToString())
    for filename, text in example.extra_files.items():
        write_if_changed(model_dir / filename, text.encode())


def build_repository(root: Path, names: Iterable[str] | None = None) -> None:
    """Build the named example models (all when ``names`` is None) under ``root``."""
    wanted = list(BUILDERS) if names is None else list(names)
    unknown = [n for n in wanted if n not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown example model(s) {unknown}; choose from {sorted(BUILDERS)}")
    root.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        write_model(root, name, BUILDERS[name]())


def main(argv: Sequence[str] | None = None) -> int:
    parser = builder_parser(
        "python -m examples.build_repository",
        "Build the example Triton model repository (ONNX models, random weights).",
        BUILDERS,
    )
    parser.add_argument(
        "--onnx-only",
        action="store_true",
        help="skip the other families' examples (PyTorch, TensorFlow, Python backend, ensembles)",
    )
    args = parser.parse_args(argv)
    build_repository(args.root, args.models)
    built = list(args.models or BUILDERS)
    if not args.models and not args.onnx_only:
        built += _other_families(args.root)
    print(f"example repository ready at {args.root}: {', '.join(built)}")
    return 0


def _other_families(root: Path) -> list[str]:
    """The Python-backend and ensemble examples, then the PyTorch and TensorFlow ones where
    their framework is installed."""
    built: list[str] = []
    from examples.build_ensemble import build_ensemble_repository, required_models
    from examples.build_python import build_python_repository

    # not the deliberately broken ones; the ensembles' Python steps; their ONNX steps exist
    ensembles = required_models()
    python_models = [
        "add_sub_python",
        "identity_python",
        "dtypes_python",
        "bls_python",
        "repeat_python",
        "text_stream_python",
        "bls_decoupled_python",
        "sequence_python",
        *ensembles.python,
    ]
    build_python_repository(root, python_models)
    build_ensemble_repository(root, steps=False)
    built += python_models + list(ensembles.ensembles)
    try:
        from examples.build_torch import BUILDERS as TORCH_BUILDERS
        from examples.build_torch import build_torch_repository
    except ImportError as exc:
        print(f"skipping the PyTorch examples: {exc} (install the extra: pip install '.[torch]')")
        return built
    build_torch_repository(root)
    built += sorted(TORCH_BUILDERS)
    try:
        from examples.build_tensorflow import BUILDERS as TF_BUILDERS
        from examples.build_tensorflow import build_tensorflow_repository
    except ImportError as exc:
        print(
            f"skipping the TensorFlow examples: {exc} "
            "(install the extra: pip install '.[tensorflow]')"
        )
        return built
    build_tensorflow_repository(root)
    return built + sorted(TF_BUILDERS)


if __name__ == "__main__":
    sys.exit(main())
