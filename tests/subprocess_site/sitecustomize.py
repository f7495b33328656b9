"""Run at start-up by the Python processes the tests spawn (``torchrun``, ``python -m isoprobe``):
the same torchvision import as the test process's own (``tests/vision_env.py``), so that
transformers, which imports torchvision to build its models, works there too. The test session
puts this folder first on ``PYTHONPATH`` (``tests/conftest.py``); nothing else sees it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
try:
    from vision_env import import_torchvision

    import_torchvision()
finally:
    sys.path.pop(0)
