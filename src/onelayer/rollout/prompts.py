"""Rendering a task's chat messages into prompt text for a given tokenizer."""

from __future__ import annotations


def render_prompts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    """Apply the tokenizer's chat template (with the assistant turn opened) when it has one;
    otherwise join the messages' contents as plain text ending in a newline."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                for messages in conversations]
    return ["\n\n".join(m["content"] for m in messages) + "\n" for messages in conversations]
