"""The ensemble service for real: tritonclient → ensemble service → steps on the ONNX service.

One pair of services (conftest.py) is shared by the whole package: test_steps.py checks ensembles
of plain steps (order, branches, outputs, failures, invalid configs, metadata and statistics),
test_decoupled_steps.py ensembles whose step is decoupled (streaming, errors, cancellation).
"""
