"""`python -m export …` from a source checkout: the same as `lipsync export …` (checkpoint → ONNX or TensorRT).
The code lives in `lipsync.export`; this folder holds no installed package."""
import sys

from lipsync.apps.cli import main

sys.exit(main(["export", *sys.argv[1:]]))
