"""What a persona's language and knowledge bases change in a conversation, on scripted engines: the ASR's
language, the detected language in the transcript, the greeting and the not-heard line, "say that
slower", each sentence reported as it plays, and passages with their sources. Engines for real:
tests/test_languages_live.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from engines.base import DETECT_LANGUAGE, Persona
from engines.knowledge import Passage
from media_server.config import ConfigError, load_settings
from media_server.conversation.persona import SLOWER_FACTOR, PersonaProfile
from media_server.runtime import personas_from, profiles_from
from media_server.testing.fakes import FixedASR, ScriptedKnowledge, ScriptedLLM
from media_server.testing.harness import Scripted

GERMAN = Persona("de", "German teacher", "Die Deutschlehrerin spricht nur Deutsch.", language="de")
REPLY = ("Die Hauptstadt", " von Deutschland", " ist Berlin.", " Das weißt du sicher.")
PASSAGE = Passage(
    document="handbook.pdf",
    page=2,
    section=None,
    text="The Zorblax QX-7731 coffee machine is in room 4.12.",
    snippet="The Zorblax QX-7731 coffee machine is in room 4.12.",
    score=1.0,
    relevance=0.8,
)


def of_type(s: Scripted, kind: str) -> list[dict[str, object]]:
    return [event for event in s.events if event["type"] == kind]


async def until_spoken(s: Scripted) -> None:
    """Until the avatar has spoken and is listening again, the clock ticking."""
    await s.until(lambda: "state:speaking" in s.types(), ticking=True)
    # The reply's final text may come just after its last frame played: the clock is stepped faster than real time.
    await s.until(lambda: "reply:final" in s.types() and s.conversation.state == "listening", ticking=True)


class SlowKnowledge(ScriptedKnowledge):
    def search(self, bases: Sequence[str], question: str) -> list[Passage]:
        time.sleep(1.0)
        return super().search(bases, question)


# --- configuration ------------------------------------------------------------------------------


def test_personas_have_a_checked_language_tag_and_the_teachers_ship_in_four_languages() -> None:
    settings = load_settings(None, {}, environ={})
    teachers = {name: p for name, p in personas_from(settings).items() if name.endswith("_teacher")}
    assert {p.language for p in teachers.values()} >= {"en", "de", "fr", "es"}
    assert all(p.display_name.split()[0] in ("English", "German", "French", "Spanish") for p in teachers.values())
    profiles = profiles_from(settings)
    assert profiles["german_teacher"].greeting and profiles["german_teacher"].not_heard
    assert profiles["german_teacher"].knowledge_bases == () and profiles["assistant"].knowledge_bases == ("default",)
    with pytest.raises(ConfigError, match="language"):
        load_settings(None, {"personas.assistant.language": "German!"}, environ={})


def test_a_knowledge_base_name_no_base_could_have_is_refused_at_start() -> None:
    settings = load_settings(None, {"personas.assistant.knowledge": '["Hand Book"]'}, environ={})
    with pytest.raises(ValueError, match="personas.assistant.knowledge"):
        profiles_from(settings)


@pytest.mark.parametrize(
    ("language", "said", "asks"),
    [
        ("en", "Could you say that slower, please?", True),
        ("en", "What is slower, a snail or a turtle?", False),
        ("de", "Bitte langsamer!", True),
        ("de", "Kannst du das noch einmal langsamer sagen?", True),
        ("fr", "Plus lentement, s'il te plaît.", True),
        ("es", "¿Puedes hablar más despacio?", True),
        ("es", "Bitte langsamer!", False),  # another language's phrase
    ],
)
def test_say_that_slower_is_heard_in_the_personas_language(language: str, said: str, asks: bool) -> None:
    profile = PersonaProfile(Persona("p", "P", "", language=language))
    assert profile.asks_slower(said) is asks


# --- language -----------------------------------------------------------------------------------


async def test_the_asr_is_asked_for_the_personas_language_in_partial_and_final_decodes(scripted) -> None:
    s = scripted(persona=PersonaProfile(GERMAN), asr=FixedASR("Wo ist der Bahnhof?", "Wo ist"), partial_interval_ms=100)
    await s.hear(2.0)
    await s.until(lambda: any(partial for _, partial in s.asr.decoded))  # still speaking: a partial decode
    await s.hear(0.6, probability=0.0)
    await s.until(s.has("reply:final"))
    partials = [language for (_, partial), language in zip(s.asr.decoded, s.asr.languages) if partial]
    assert partials and set(partials) == {"de"} and s.asr.languages[-1] == "de"
    assert "language" not in of_type(s, "transcript")[-1]  # only when the persona detects it


async def test_a_detected_language_comes_with_the_transcript(scripted) -> None:
    profile = PersonaProfile(GERMAN, detect_language=True)
    s = scripted(persona=profile, asr=FixedASR("Where is the station?", detected="en"))
    await s.hear(1.0)
    await s.hear(0.6, probability=0.0)
    await s.until(s.has("reply:final"))
    assert s.asr.languages[-1] == DETECT_LANGUAGE
    final = next(e for e in of_type(s, "transcript") if e["final"])
    assert final["language"] == "en" and final["text"] == "Where is the station?"


async def test_the_greeting_is_said_and_remembered(scripted) -> None:
    s = scripted(persona=PersonaProfile(GERMAN, greeting="Hallo! Worüber möchtest du sprechen?"))
    s.conversation.greet()
    await until_spoken(s)
    assert " ".join(text for text, _ in s.tts.spoken) == "Hallo! Worüber möchtest du sprechen?"
    assert s.llm.asked == []
    assert [(m.role, m.text) for m in s.conversation.history] == [("assistant", "Hallo! Worüber möchtest du sprechen?")]


async def test_no_greeting_says_nothing(scripted) -> None:
    s = scripted(persona=PersonaProfile(GERMAN))
    s.conversation.greet()
    assert s.events == [] and s.tts.spoken == []


async def test_speech_without_words_gets_the_not_heard_line_kept_out_of_the_history(scripted) -> None:
    s = scripted(persona=PersonaProfile(GERMAN, not_heard="Wie bitte?"), asr=FixedASR("", ""))
    await s.hear(1.0)
    await s.hear(0.6, probability=0.0)
    await until_spoken(s)
    assert s.tts.spoken == [("Wie bitte?", 1.0)] and s.llm.asked == []
    assert s.conversation.history == []


async def test_speech_without_words_and_no_not_heard_line_is_ignored(scripted) -> None:
    s = scripted(persona=PersonaProfile(GERMAN), asr=FixedASR("", ""))
    await s.hear(1.0)
    await s.hear(0.6, probability=0.0)
    await s.until(lambda: s.types()[-1:] == ["state:listening"])
    assert s.tts.spoken == [] and "reply:delta" not in s.types()


# --- say that slower ------------------------------------------------------------------------------


async def test_say_that_slower_repeats_the_last_reply_slower_and_keeps_the_rate(scripted) -> None:
    s = scripted(persona=PersonaProfile(GERMAN), llm=ScriptedLLM(REPLY))
    s.conversation.submit_text("Was ist die Hauptstadt von Deutschland?")
    await until_spoken(s)
    first_reply = s.conversation.history[-1].text
    spoken_before = len(s.tts.spoken)
    s.events.clear()

    s.conversation.submit_text("Bitte langsamer!")
    await until_spoken(s)
    repeated = s.tts.spoken[spoken_before:]
    assert " ".join(text for text, _ in repeated) == first_reply  # the same words ...
    assert {speed for _, speed in repeated} == {SLOWER_FACTOR}  # ... more slowly
    assert len(s.llm.asked) == 1, "a repetition, not a new reply"
    assert [m.text for m in s.conversation.history] == ["Was ist die Hauptstadt von Deutschland?", first_reply]

    spoken_before = len(s.tts.spoken)
    s.conversation.submit_text("Und von Frankreich?")
    await s.until(lambda: len(s.llm.asked) == 2 and s.types()[-1:] == ["reply:final"])
    await s.until(lambda: len(s.tts.spoken) > spoken_before)
    assert {speed for _, speed in s.tts.spoken[spoken_before:]} == {SLOWER_FACTOR}, "the next replies stay slower"


# --- sentences as they are spoken ------------------------------------------------------------------


async def test_each_sentence_is_reported_when_its_first_frame_plays(scripted) -> None:
    s = scripted(llm=ScriptedLLM(("The capital of France is Paris.", " It is a big city.")))
    s.conversation.submit_text("Tell me about Paris.")
    await s.until(s.has("reply:final"))
    spoken_on: list[int] = []  # the reply's frame that was playing when each sentence was reported
    async with asyncio.timeout(5):
        while s.types()[-1] != "state:listening":
            reported = len(of_type(s, "spoken"))
            await s.output.play_tick()
            if len(of_type(s, "spoken")) > reported:
                spoken_on.append(s.pictures[-1])
            await asyncio.sleep(0.002)
    sentences = [text for text, _ in s.tts.spoken]
    assert (
        [e["text"] for e in of_type(s, "spoken")]
        == sentences
        == ["The capital of France is Paris.", "It is a big city."]
    )
    # Frame k of the reply shows its samples [k * spf, (k + 1) * spf): the second sentence starts on the frame
    # after the first sentence's audio (ToneTTS: 0.1 s a word, 6 words; 25 frames a second).
    assert spoken_on == [1, round(6 * 0.1 * 25) + 1]
    assert of_type(s, "spoken")[0] == {"type": "spoken", "turn": 1, "text": "The capital of France is Paris."}


# --- knowledge --------------------------------------------------------------------------------------


async def test_passages_go_to_the_llm_and_their_sources_to_the_client_before_the_reply(scripted) -> None:
    knowledge = ScriptedKnowledge({"default": [PASSAGE]})
    s = scripted(persona=PersonaProfile(Persona("ava", "Ava", "Ava helps.")), knowledge=knowledge)
    s.conversation.submit_text("Where is the Zorblax coffee machine?")
    await s.until(s.has("reply:final"))
    assert knowledge.searched == [(("default",), "Where is the Zorblax coffee machine?")]
    assert "[1] handbook.pdf, page 2\nThe Zorblax QX-7731 coffee machine is in room 4.12." in s.llm.contexts[0]
    assert s.types().index("sources") < s.types().index("reply:delta")
    assert of_type(s, "sources") == [
        {
            "type": "sources",
            "turn": 1,
            "sources": [{"document": "handbook.pdf", "location": "page 2", "snippet": PASSAGE.snippet}],
        }
    ]


@pytest.mark.parametrize("named", [(), ("manuals",)])
async def test_a_persona_never_answers_from_a_base_it_was_not_given(scripted, named: tuple[str, ...]) -> None:
    knowledge = ScriptedKnowledge({"default": [PASSAGE]})  # "default" exists; "manuals" does not
    s = scripted(persona=PersonaProfile(Persona("ava", "Ava", "Ava helps."), knowledge=named), knowledge=knowledge)
    s.conversation.submit_text("Where is the Zorblax coffee machine?")
    await s.until(s.has("reply:final"))
    assert knowledge.searched == [] and s.llm.contexts == [""] and "sources" not in s.types()


async def test_no_relevant_passage_means_no_sources_event(scripted) -> None:
    knowledge = ScriptedKnowledge({"default": []})  # searched, nothing above the relevance threshold
    s = scripted(persona=PersonaProfile(Persona("ava", "Ava", "Ava helps.")), knowledge=knowledge)
    s.conversation.submit_text("What is the capital of France?")
    await s.until(s.has("reply:final"))
    assert len(knowledge.searched) == 1 and s.llm.contexts == [""] and "sources" not in s.types()


async def test_a_slow_search_fails_the_turn_within_its_deadline(scripted) -> None:
    s = scripted(
        persona=PersonaProfile(Persona("ava", "Ava", "Ava helps.")),
        knowledge=SlowKnowledge({"default": [PASSAGE]}),
        knowledge_s=0.2,
    )
    s.conversation.submit_text("Where is the coffee machine?")
    await s.until(s.has("error"))
    error = of_type(s, "error")[0]
    assert error["code"] == "turn_failed" and "knowledge_s" in error["message"]
    assert s.llm.asked == [] and s.tts.spoken == []
