"""Fixtures: the tiny model and one live in-process server shared by the server tests."""

from __future__ import annotations

import pytest
import torch
from server_harness import InProcessServer


@pytest.fixture(scope="session")
def one_thread():
    """The engine is tiny: one intra-op thread is faster, and kinder to a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tiny_model_factory):
    """(path, hf_model, tokenizer) of the tiny random Llama with a chat template."""
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def api_server(tiny, one_thread):
    """The shared server: API key required, 4096-token KV cache, max_model_len 256, 1 MiB body limit."""
    server = InProcessServer(tiny[0], max_request_body_bytes=1 << 20).start()
    yield server
    server.stop()
