"""TensorFlow family: SavedModel (``model.savedmodel/``) models, Triton's ``tensorflow_savedmodel``.

``python -m services.tensorflow --model-repository DIR`` serves them; TensorFlow is imported only
inside this package (install the extra: ``pip install '.[tensorflow]'``). Importing the package
turns TensorFlow's C++ logging down to warnings and errors (``TF_CPP_MIN_LOG_LEVEL=2``) unless the
environment already chose a level, because TensorFlow reads it once, at its own import.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
