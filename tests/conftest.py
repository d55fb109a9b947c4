import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Build (once per session) a tiny random model dir; returns (path, hf_model, tokenizer)."""
    cache: dict = {}

    def make(arch: str = "llama", **overrides):
        key = (arch, repr(sorted(overrides.items())))
        if key not in cache:
            path = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
            model, tok = tiny_models.build_model_dir(path, arch, **overrides)
            cache[key] = (path, model, tok)
        return cache[key]

    return make
