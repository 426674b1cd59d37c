"""Which of a TTS engine's voices speaks a language."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def best_voice(language: str, voice_languages: Mapping[str, Sequence[tuple[str, int]]]) -> str | None:
    """The voice that best speaks ``language``, a BCP-47 tag ("de-DE", "pt-BR", "en"); None if none does.

    ``voice_languages`` gives the languages each voice speaks as (lower-case tag, priority) pairs, a
    lower priority a better match. "pt-BR" wants a voice for "pt-br", else one for "pt"."""
    subtags = language.lower().replace("_", "-").split("-")
    for length in range(len(subtags), 0, -1):
        tag = "-".join(subtags[:length])
        matches = [
            (priority, index, name)
            for index, (name, pairs) in enumerate(voice_languages.items())
            for spoken, priority in pairs
            if spoken == tag
        ]
        if matches:
            return min(matches)[2]
    return None
