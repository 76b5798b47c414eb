"""Shared fixtures: a character-level tokenizer and a tiny llama saved as a local model directory."""

from __future__ import annotations

import os

# the fast engine's Triton kernels run on CPU through Triton's interpreter, chosen before triton is imported
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from .tiny import make_char_tokenizer, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory, tokenizer):
    """A tiny llama saved with save_pretrained, as a user's local model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
