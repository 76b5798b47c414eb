"""Shared fixtures: a character-level tokenizer and a tiny llama saved as a local model directory."""

from __future__ import annotations

import pytest

from .tiny import make_char_tokenizer, tiny_model


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
