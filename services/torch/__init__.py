"""PyTorch family: TorchScript (``model.pt``) and torch.export (``model.pt2``) models.

``python -m services.torch --model-repository DIR`` serves them; torch is imported only inside
this package (install the extra: ``pip install '.[torch]'``).
"""
