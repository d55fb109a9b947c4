"""A byte-level tokenizer for CPU benchmarks (the same recipe as the tests' tiny models)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from tiny_models import build_tokenizer  # noqa: E402,F401
