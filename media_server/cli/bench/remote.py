"""``facecast bench remote``: what an LLM on an OpenAI-compatible server costs over the same model in the
process, the HTTP hop alone. The embedded GGUF is loaded here with llama-cpp-python and also served by
llama-cpp-python's own server (``llama_cpp.server``); both are asked the same chat messages (the persona
and one corpus question, each question new to both) in turn, and the time to the first text of the reply
is compared: in the process (``create_chat_completion``, streamed) against through ``llm.engine =
"openai"`` (the engine's client thread, HTTP on loopback, JSON, server-sent events, the server's own
request handling)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

from llama_cpp import Llama

from engines.base import ChatMessage
from engines.llm.llama_cpp import LlamaCppLLM, cache_directory, embedded_model_path
from engines.llm.openai import OpenAILLM, chat_messages
from media_server.cli.bench.output import print_summary
from media_server.config import Settings
from media_server.runtime import personas_from
from media_server.testing.llama_server import running_llama_server
from media_server.testing.speech_corpus import QUESTIONS

N_CTX, THREADS, HISTORY_BUDGET = 2048, 2, 2048
MAX_TOKENS = 8


def _first_text_ms(chunks: Iterator[str]) -> float:
    """Milliseconds to the reply's first text (or its end, for the rare reply without any)."""
    started = time.perf_counter()
    next((text for text in chunks if text), None)
    return (time.perf_counter() - started) * 1000


def _local_deltas(model: Llama, messages: list[dict[str, str]]) -> Iterator[str]:
    for chunk in model.create_chat_completion(messages, stream=True, max_tokens=MAX_TOKENS, temperature=0.0, seed=0):
        yield chunk["choices"][0]["delta"].get("content") or ""


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 1), "p95": round(ordered[round(0.95 * (len(ordered) - 1))], 1)}


def main(args: argparse.Namespace, settings: Settings) -> None:
    persona = personas_from(settings)[settings.server.default_persona]
    path = embedded_model_path(cache_directory(LlamaCppLLM.Settings()))
    local = Llama(str(path), n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS, seed=0, verbose=False)
    times: dict[str, list[float]] = {"in the process": [], "llm.engine = openai": []}
    with running_llama_server(path, N_CTX, THREADS) as server:
        remote = OpenAILLM(OpenAILLM.Settings(base_url=server.base_url, max_tokens=MAX_TOKENS, temperature=0.0))
        try:
            remote.warm_up()
            _first_text_ms(_local_deltas(local, [{"role": "user", "content": "Hello!"}]))
            for index in range(args.n):
                history = [ChatMessage("user", QUESTIONS[index % len(QUESTIONS)])]
                messages = chat_messages(persona, history, HISTORY_BUDGET)
                runs = {
                    "in the process": lambda: _first_text_ms(_local_deltas(local, messages)),
                    "llm.engine = openai": lambda: _first_text_ms(remote.stream_reply(persona, history, lambda: False)),
                }
                for name in list(runs)[:: 1 if index % 2 else -1]:  # neither always goes first
                    times[name].append(runs[name]())
        finally:
            remote.close()
    summary = {name: _percentiles(values) for name, values in times.items()}
    local_p50, remote_p50 = summary["in the process"]["p50"], summary["llm.engine = openai"]["p50"]
    local_p95, remote_p95 = summary["in the process"]["p95"], summary["llm.engine = openai"]["p95"]
    summary["the hop"] = {"p50": round(remote_p50 - local_p50, 1), "p95": round(remote_p95 - local_p95, 1)}
    title = f"time to the first text of a reply (or its end), ms ({args.n} questions, {path.name})"
    print_summary({title: summary}, args.json, sections=True)
