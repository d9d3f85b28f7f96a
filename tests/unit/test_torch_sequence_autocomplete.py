"""torch.export auto-complete of a stateful model: the server's control and state tensors
(sequence_batching) stay out of the client-facing config, matched by name or position."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from protos.gen.inference import model_config_pb2 as mc

torch = pytest.importorskip("torch")

from examples.build_torch import SequenceAccumulator  # noqa: E402
from services.torch.autocomplete import autocomplete_exported  # noqa: E402

SECTIONS = {
    "by position": """
      control_input [
        { name: "START__1" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] } ] },
        { name: "READY__2" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [0, 1] } ] }
      ]
      state [ { input_name: "ACC_IN__3" output_name: "ACC_OUT__1" data_type: TYPE_INT32
                dims: [ 1 ] } ]""",
    "by name": """
      control_input [
        { name: "start" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] } ] },
        { name: "ready" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [0, 1] } ] }
      ]
      state [ { input_name: "acc_in" output_name: "OUTPUT__1" data_type: TYPE_INT32
                dims: [ 1 ] } ]""",
}


@pytest.mark.parametrize("section", list(SECTIONS))
def test_exported_stateful_model_completes_only_the_clients_tensors(
    tmp_path: Path, section: str
) -> None:
    example = torch.ones((2, 1), dtype=torch.int32)
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(
        SequenceAccumulator(),
        (example, example, example, example),
        dynamic_shapes=tuple({0: batch} for _ in range(4)),
    )
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    config = text_format.Parse(
        f'name: "acc" max_batch_size: 8 sequence_batching {{ {SECTIONS[section]} }}',
        mc.ModelConfig(),
    )
    autocomplete_exported(config, path)
    assert [(i.name, list(i.dims)) for i in config.input] == [("value", [1])]
    assert [o.name for o in config.output] == ["OUTPUT__0"]
