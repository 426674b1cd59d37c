"""How passages from a persona's documents are shown to a model with its reply's question."""

from __future__ import annotations

# In a completion prompt, on its own line before the passages (which come before the question).
CONTEXT_HEADER = "From the documents:"


def question_with_context(question: str, context: str) -> str:
    """A chat model's user message: the passages to answer from, then the question."""
    return f"Answer from these passages when they hold the answer:\n{context.strip()}\n\nQuestion: {question}"
