"""TensorRT family: serialized engines (``model.plan``, platform ``tensorrt_plan``) on a CUDA GPU.

``python -m services.tensorrt --model-repository DIR`` serves them; tensorrt is imported only
inside this package, lazily (install the extra on a machine with a GPU:
``pip install '.[tensorrt]'``). Without TensorRT or a GPU the service refuses to start.
"""
