"""A persona as a conversation uses it: what the LLM reads, and what the server does around it in the
persona's language (what the ASR listens for, what the avatar says by itself, "say that slower",
the knowledge bases it answers from)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engines.base import DETECT_LANGUAGE, Persona, primary_language
from engines.knowledge import DEFAULT_BASE

# How a learner asks to hear the last reply again, more slowly, by language (lower case, without
# punctuation); a persona's ``slower_phrases`` add to these.
SLOWER_PHRASES: dict[str, tuple[str, ...]] = {
    "en": ("say that slower", "say it slower", "slower please", "more slowly", "speak slower", "slow down"),
    "de": (
        "bitte langsamer",
        "langsamer bitte",
        "sag das langsamer",
        "sag es langsamer",
        "sprich langsamer",
        "sprechen sie langsamer",
        "langsamer sprechen",
        "nochmal langsamer",
        "noch einmal langsamer",
    ),
    "fr": ("plus lentement", "moins vite", "parle lentement", "parlez lentement"),
    "es": ("más despacio", "mas despacio", "más lento", "mas lento", "habla despacio", "hable despacio"),
}
SLOWER_FACTOR = 0.75  # each request multiplies the speech rate by this
SLOWEST = 0.5


@dataclass(frozen=True)
class PersonaProfile:
    persona: Persona  # what the LLM reads: name, prompt, examples, language
    detect_language: bool = False
    greeting: str = ""
    not_heard: str = ""
    slower_phrases: tuple[str, ...] = ()  # besides SLOWER_PHRASES of its language
    knowledge: tuple[str, ...] | None = None  # None: the "default" base, when it exists

    @property
    def name(self) -> str:
        return self.persona.name

    @property
    def display_name(self) -> str:
        return self.persona.display_name

    @property
    def language(self) -> str:
        return self.persona.language

    @property
    def knowledge_bases(self) -> tuple[str, ...]:
        """The bases it answers from, whether they exist yet or not."""
        return self.knowledge if self.knowledge is not None else (DEFAULT_BASE,)

    @property
    def asr_language(self) -> str:
        """What the ASR is asked to transcribe in: the persona's language, or to detect it."""
        return DETECT_LANGUAGE if self.detect_language else self.persona.language

    def asks_slower(self, text: str) -> bool:
        """Whether ``text`` (what the user said or typed) asks to hear the last reply more slowly."""
        said = f" {_words(text)} "
        phrases = (*SLOWER_PHRASES.get(primary_language(self.language), ()), *self.slower_phrases)
        return any(f" {_words(phrase)} " in said for phrase in phrases if _words(phrase))


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def slower(speed: float) -> float:
    return max(SLOWEST, round(speed * SLOWER_FACTOR, 3))
