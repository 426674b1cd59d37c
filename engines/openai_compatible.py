"""What the engines that use an OpenAI-compatible server share (Ollama, vLLM, llama.cpp's server,
OpenAI, speaches, Kokoro-FastAPI, ...): settings, the HTTP client, deadlines, retries and errors.

Each engine owns one ``OpenAIClient``: a private asyncio event loop in a daemon thread with one
``aiohttp.ClientSession``, so connections are kept alive and reused across calls and threads. The
blocking engine methods submit coroutines to that loop and wait for their results; abandoning a
stream cancels its coroutine, which closes the HTTP connection at once instead of reading the rest.

Every failure becomes a ``RemoteServerError`` whose message names the server and the setting to
check. The API key is read from the environment variable that ``api_key_env`` names; it is sent as a
bearer token and never appears in settings, logs, errors or ``describe()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from pydantic import Field, field_validator

from engines.base import EngineConfigError, EngineSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often a blocked engine call checks whether its caller gave up on it (a barge-in).
CANCEL_POLL_S = 0.02
# How long abandoning a stream waits for its connection to be closed.
CANCEL_WAIT_S = 2.0
CLOSE_WAIT_S = 5.0
RETRY_DELAY_S = 0.5
DESCRIBE_TIMEOUT_S = 3.0
DESCRIBED_MODELS = 20  # a model list longer than this is cut in describe()
ERROR_BODY_CHARS = 300  # of a server's error answer, quoted in the message
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
ENVIRONMENT_VARIABLE = re.compile(r"[A-Z_][A-Z0-9_]*")  # upper case: a key pasted here by mistake is refused


class RemoteServerError(RuntimeError):
    """A model server could not be used; the message says which server and what to check."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class RemoteSettings(EngineSettings):
    """The settings every engine on an OpenAI-compatible server has."""

    base_url: str  # the API root, usually ending in /v1: http://localhost:11434/v1
    model: str | None = None  # None: the server's only model (its /models list)
    api_key_env: str | None = None  # the NAME of the environment variable holding the key, not the key
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)  # the longest wait for an answer, or for more of it
    retries: int = Field(1, ge=0, le=10)  # only before anything of the answer has arrived

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL such as http://localhost:11434/v1")
        if parts.username or parts.password:
            raise ValueError("holds credentials: give the key in the variable api_key_env names instead")
        return url.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, name: str | None) -> str | None:
        # The message never quotes the value: it may be the key itself.
        if name is not None and not ENVIRONMENT_VARIABLE.fullmatch(name):
            raise ValueError("must be the name of an environment variable (such as OPENAI_API_KEY), not the key")
        return name


@dataclass(frozen=True)
class Deadline:
    """How long the server may take to send the first piece of an answer, and which setting says so."""

    seconds: float
    setting: str | None  # None: not a setting (a fixed, short look)


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()


def read_api_key(variable: str | None, stage: str) -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable, "").strip()
    if not key:
        raise EngineConfigError(
            f"{stage}.api_key_env names the environment variable {variable}, which is not set: "
            f"export {variable}=<your key>, or remove {stage}.api_key_env for a server without keys"
        )
    return key


def server_error_detail(body: str) -> str:
    """The message in an error answer (OpenAI's {"error": {"message"}}, FastAPI's {"detail"}), else its text."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = " ".join(body.split())
    if isinstance(answer, dict):
        answer = answer.get("error", answer.get("detail", answer))
    if isinstance(answer, dict):
        answer = answer.get("message", answer)
    return str(answer)[:ERROR_BODY_CHARS]


class OpenAIClient:
    """One engine's connection to its server: ``stream`` and ``call`` are blocking and thread-safe."""

    def __init__(self, settings: RemoteSettings, stage: str, server: str) -> None:
        self.settings = settings
        self.stage = stage
        self.where = f"the {server} at {settings.base_url}"
        self._api_key = read_api_key(settings.api_key_env, stage)
        self._model = settings.model
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{stage}-openai-client", daemon=True)
        self._thread.start()
        self._session = asyncio.run_coroutine_threadsafe(self._open_session(), self._loop).result()

    async def _open_session(self) -> aiohttp.ClientSession:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s)
        return aiohttp.ClientSession(headers=headers, timeout=timeout)

    # --- errors -------------------------------------------------------------

    def error(self, message: str, retryable: bool = False) -> RemoteServerError:
        """An error to raise; a server that echoes the key in its answer does not get it into the message."""
        if self._api_key:
            message = message.replace(self._api_key, "[API key]")
        return RemoteServerError(message, retryable)

    def _failure(self, error: Exception, received: bool, deadline: Deadline) -> RemoteServerError:
        s, stage = self.settings, self.stage
        if isinstance(error, RemoteServerError):
            return error
        if isinstance(error, aiohttp.ConnectionTimeoutError):
            return self.error(
                f"{self.where} did not accept a connection within {s.connect_timeout_s:g} s ({stage}.connect_timeout_s)",
                retryable=True,
            )
        if isinstance(error, aiohttp.ClientConnectorError):
            refused = isinstance(error.os_error, ConnectionRefusedError)
            reason = "connection refused" if refused else error.os_error.strerror or str(error.os_error)
            return self.error(f"cannot reach {self.where}: {reason} (is it running? {stage}.base_url)", retryable=True)
        if isinstance(error, TimeoutError):
            if received:
                return self.error(f"{self.where} stopped sending for {s.read_timeout_s:g} s ({stage}.read_timeout_s)")
            setting = f" ({stage}.{deadline.setting})" if deadline.setting else ""
            return self.error(f"{self.where} did not answer within {deadline.seconds:g} s{setting}", retryable=True)
        if isinstance(error, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            return self.error(f"{self.where} closed the connection before its answer was complete", retryable=True)
        return self.error(f"{self.where} failed: {type(error).__name__}: {error}")

    async def _raise_for_status(self, response: aiohttp.ClientResponse, path: str) -> None:
        if response.status < 400:
            return
        body = (await response.content.read(4 * ERROR_BODY_CHARS)).decode("utf-8", "replace")
        detail = server_error_detail(body)
        message = f"{self.where} answered {response.status} {response.reason} to /{path}" + (
            f": {detail}" if detail else ""
        )
        if response.status in (401, 403):
            message += (
                f" (check the key in the variable {self.stage}.api_key_env names)"
                if self._api_key
                else f" (the server wants a key: set {self.stage}.api_key_env to the name of a variable holding it)"
            )
        elif response.status == 404:
            message += f" (check {self.stage}.base_url, which usually ends in /v1, and {self.stage}.model)"
        raise self.error(message, retryable=response.status in RETRYABLE_STATUSES)

    # --- requests (on the client's loop) ------------------------------------

    @contextlib.asynccontextmanager
    async def request(self, method: str, path: str, **options: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a successful status; one left unread is closed, not drained (barge-in)."""
        async with self._session.request(method, f"{self.settings.base_url}/{path}", **options) as response:
            await self._raise_for_status(response, path)
            try:
                yield response
            finally:
                if not response.content.at_eof():
                    response.close()

    async def json(self, response: aiohttp.ClientResponse) -> Any:
        body = await response.read()
        try:
            return json.loads(body)
        except ValueError:
            raise self.error(f"{self.where} answered with something that is not JSON: {body[:80]!r}") from None

    async def sse_data(self, response: aiohttp.ClientResponse) -> AsyncIterator[str]:
        """The ``data`` of each server-sent event, as it arrives."""
        content_type = response.content_type.lower()
        if content_type != "text/event-stream":
            raise self.error(f"{self.where} answered {content_type}, not a stream of events (text/event-stream)")
        data: list[str] = []
        try:
            async for raw in response.content:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line:
                    if data:
                        yield "\n".join(data)
                        data = []
                    continue
                field, _, value = line.partition(":")
                if field == "data":
                    data.append(value.removeprefix(" "))
                elif field not in ("", "event", "id", "retry"):  # "": a comment, such as a keep-alive ping
                    raise self.error(f"{self.where} sent a line that is not a server-sent event: {line[:80]!r}")
        except (UnicodeDecodeError, ValueError) as error:  # ValueError: aiohttp's "line too long"
            raise self.error(f"{self.where} sent something that is not a stream of events: {error}") from None
        if data:
            yield "\n".join(data)

    async def model(self) -> str:
        """The configured model, else the server's only one."""
        if self._model is None:
            models = await self.models()
            if len(models) != 1:
                listed = ", ".join(models) if models else "none"
                raise self.error(
                    f"{self.where} serves {len(models)} models ({listed}): name the one to use in {self.stage}.model"
                )
            self._model = models[0]
            log.info("%s serves one model, %r: using it", self.where, self._model)
        return self._model

    async def models(self) -> list[str]:
        async with self.request("GET", "models") as response:
            answer = await self.json(response)
        try:
            return [str(entry["id"]) for entry in answer["data"]]
        except (KeyError, TypeError):
            raise self.error(f"{self.where} answered /models without a model list: {str(answer)[:80]}") from None

    async def _attempts(
        self, make_items: Callable[[], AsyncIterator[T]], put: Callable[[T], None], deadline: Deadline
    ) -> None:
        """Pass on what ``make_items()`` yields; a failure before the first item is tried again (``retries``)."""
        for attempt in range(self.settings.retries + 1):
            received = False
            try:
                async with asyncio.timeout(deadline.seconds) as timeout:
                    async for item in make_items():
                        received = True
                        put(item)
                        timeout.reschedule(asyncio.get_running_loop().time() + self.settings.read_timeout_s)
                return
            except (RemoteServerError, aiohttp.ClientError, OSError) as error:  # OSError: TimeoutError too
                failure = self._failure(error, received, deadline)
                if received or not failure.retryable or attempt == self.settings.retries:
                    raise failure from None
                log.warning(
                    "%s; trying again (%d of %d, %s.retries)", failure, attempt + 1, self.settings.retries, self.stage
                )
                await asyncio.sleep(RETRY_DELAY_S)

    # --- blocking calls (from any thread) ------------------------------------

    def stream(
        self, make_items: Callable[[], AsyncIterator[T]], cancelled: Callable[[], bool], deadline: Deadline
    ) -> Iterator[T]:
        """Yield what ``make_items()`` yields on the client's loop, as it arrives.

        Once ``cancelled()`` is true, or the iterator is closed, the request is cancelled: its
        connection is closed at once and nothing more is read.
        """
        if self._closed:
            raise self.error(f"the {self.stage} engine is closed")
        items: queue.SimpleQueue[object] = queue.SimpleQueue()
        started, finished = threading.Event(), threading.Event()

        async def produce() -> None:
            started.set()
            try:
                await self._attempts(make_items, items.put, deadline)
            except Exception as error:  # noqa: BLE001 - whatever it is, the caller raises it
                items.put(_Failed(error))
            except asyncio.CancelledError:  # abandoned by its caller, or the engine was closed
                items.put(_Failed(self.error(f"the {self.stage} engine was closed during the request")))
                raise
            finally:
                items.put(_END)
                finished.set()

        future = asyncio.run_coroutine_threadsafe(produce(), self._loop)
        try:
            while not cancelled():
                try:
                    item = items.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    if not self._thread.is_alive():  # closed before this request could start
                        raise self.error(f"the {self.stage} engine is closed") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item  # type: ignore[misc]
        finally:
            if not finished.is_set():
                future.cancel()
                if started.is_set():
                    finished.wait(CANCEL_WAIT_S)

    def call(self, make_result: Callable[[], Awaitable[T]], deadline: Deadline) -> T:
        """The result of one request, with the same deadlines and retries as a stream."""

        async def one() -> AsyncIterator[T]:
            yield await make_result()

        with contextlib.closing(self.stream(one, lambda: False, deadline)) as results:
            return next(results)

    def answer_deadline(self) -> Deadline:
        return Deadline(self.settings.read_timeout_s, "read_timeout_s")

    def warm_up(self, run_once: Callable[[], object]) -> None:
        """Run one small request; a server that is down is a warning (it may come up later), not a failure."""
        try:
            run_once()
        except RemoteServerError as error:
            log.warning(
                "%s; the %s engine is loaded anyway, and each request fails until the server answers", error, self.stage
            )

    def describe(self) -> dict[str, object]:
        """The server, its model, and whether it answers now (a short look at its /models)."""
        s = self.settings
        description: dict[str, object] = {
            "base_url": s.base_url,
            "model": s.model or "auto: the server's only model",
            "api_key": f"from the environment variable {s.api_key_env}" if s.api_key_env else "none",
            "timeouts": f"connect {s.connect_timeout_s:g} s, answer {s.read_timeout_s:g} s, retries {s.retries}",
        }
        try:
            models = asyncio.run_coroutine_threadsafe(
                asyncio.wait_for(self.models(), DESCRIBE_TIMEOUT_S), self._loop
            ).result()
        except (RemoteServerError, aiohttp.ClientError, OSError) as error:
            description["server"] = f"not reachable: {self._failure(error, False, Deadline(DESCRIBE_TIMEOUT_S, None))}"
            return description
        if s.model is None:
            only = models[0] if len(models) == 1 else f"none: it serves {len(models)}, set {self.stage}.model"
            description["model"] = f"auto: the server's only model ({only})"
        more = f" (and {len(models) - DESCRIBED_MODELS} more)" if len(models) > DESCRIBED_MODELS else ""
        description["server"] = f"reachable, serving {len(models)} model(s)"
        description["models"] = ", ".join(models[:DESCRIBED_MODELS]) + more
        return description

    def close(self) -> None:
        """Cancel whatever is running, close the session and stop the loop thread."""
        if self._closed:
            return
        self._closed = True

        async def shut_down() -> None:
            running = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await self._session.close()

        try:
            asyncio.run_coroutine_threadsafe(shut_down(), self._loop).result(CLOSE_WAIT_S)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CLOSE_WAIT_S)
            if not self._thread.is_alive():
                self._loop.close()
