"""Configuration: ``config/default.toml``, then a user file, then ``FACECAST__SECTION__KEY`` environment
variables, then ``--set section.key=value`` flags; later sources win. Validated with pydantic so a
mistake is reported as ``section.key: what is wrong`` before anything starts.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from engines import PROJECT_ROOT

DEFAULT_CONFIG = PROJECT_ROOT / "config" / "default.toml"
ENV_PREFIX = "FACECAST__"


class ConfigError(ValueError):
    """The configuration is invalid; the message names each bad setting."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IceServer(Strict):
    urls: list[str]
    username: str | None = None
    credential: str | None = None


ORIGIN_PATTERN = r"^(\*|https?://[^/\s]+)$"
HOST_PATTERN = r"^[A-Za-z0-9.-]{1,253}$"


class ServerSettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_sessions: int = Field(4, ge=1)
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    # A session whose client sends nothing (no mic audio, no data) for this long is closed.
    client_timeout_s: float = Field(15.0, gt=0)
    # A session or viewer whose peer connection has not connected this long after the offer is closed.
    connect_timeout_s: float = Field(10.0, gt=0)
    # New sessions and viewers one client address may open a minute (0: no limit).
    offers_per_minute: int = Field(30, ge=0)
    avatars_dir: Path = PROJECT_ROOT / "avatars"
    static_dir: Path = PROJECT_ROOT / "static"
    default_avatar: str = "default"
    default_persona: str = "assistant"
    ice_servers: list[IceServer] = []
    # Browsers use only TURN relays (iceTransportPolicy "relay"): hides their addresses, crosses strict NATs.
    relay_only: bool = False
    # Bearer token for the broadcast API (/api/sessions); without one that API only answers loopback clients.
    api_token: str | None = Field(None, min_length=16)
    # Web sites (scheme://host[:port], or "*") whose pages may use this server from the browser (embed.js).
    allowed_origins: list[Annotated[str, StringConstraints(pattern=ORIGIN_PATTERN)]] = []
    # Names this server is reached by besides IP addresses, localhost, this machine's name and `host`
    # (e.g. the name a reverse proxy forwards): any other Host is refused (DNS rebinding).
    allowed_hosts: list[Annotated[str, StringConstraints(pattern=HOST_PATTERN, to_lower=True)]] = []
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.relay_only and not any(url.startswith(("turn:", "turns:")) for s in self.ice_servers for url in s.urls):
            raise ValueError("relay_only needs a TURN server (a turn: or turns: url) in ice_servers")
        return self


class BroadcastSettings(Strict):
    """Broadcast sessions: an avatar driven by the HTTP API, watched over WHEP, /obs, or pushed by RTMP."""

    # The broadcast session that `POST /whep` and `/obs` use when none is named, and that rtmp_url starts.
    default_id: str = Field("main", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    max_viewers: int = Field(4, ge=1)  # per broadcast session; each viewer costs one video encode
    reply_timeout_s: float = Field(60.0, gt=0)  # how long POST .../chat waits for the reply's text
    # The default broadcast, when started by its first viewer (not the API), stops this long after its last left.
    idle_stop_s: float = Field(30.0, gt=0)
    max_rtmp_pushes: int = Field(2, ge=1)  # RTMP destinations per broadcast session (each costs an encode)
    # When set, the server starts the default broadcast session at launch and pushes it here (rtmp:// or rtmps://).
    rtmp_url: str | None = Field(None, pattern=r"^rtmps?://")
    rtmp_video_kbps: int = Field(2000, ge=100)
    rtmp_audio_kbps: int = Field(128, ge=32)
    rtmp_keyframe_s: float = Field(2.0, gt=0)


OPUS_SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)


class MediaSettings(Strict):
    fps: int = Field(25, ge=5, le=60)
    idle_fps: int = Field(1, ge=1, le=60)
    sample_rate: int = 48000
    audio_packet_ms: Literal[20, 40, 60] = 20
    mic_jitter_buffer_packets: int = Field(1, ge=1, le=15)

    @model_validator(mode="after")
    def _whole_samples_per_frame(self) -> MediaSettings:
        if self.sample_rate not in OPUS_SAMPLE_RATES:
            raise ValueError(f"sample_rate {self.sample_rate} must be one Opus encodes: {OPUS_SAMPLE_RATES}")
        if self.sample_rate % self.fps:
            raise ValueError(f"sample_rate {self.sample_rate} must be a multiple of fps {self.fps}")
        if self.idle_fps > self.fps:
            raise ValueError(f"idle_fps {self.idle_fps} must not exceed fps {self.fps}")
        return self


class TurnTakingSettings(Strict):
    """When the user has started, paused, finished, or interrupted the avatar (conversation/turn_policy.py)."""

    vad_threshold: float = Field(0.5, gt=0, lt=1)
    min_speech_ms: int = Field(150, ge=0)
    min_silence_ms: int = Field(500, ge=50)
    speculative_silence_ms: int = Field(96, ge=0)  # 0 turns speculative replies off
    pause_avatar_after_ms: int = Field(64, ge=0)
    min_interruption_ms: int = Field(320, ge=0)
    false_interruption_timeout_ms: int = Field(400, ge=0)
    pre_roll_ms: int = Field(300, ge=0)
    partial_interval_ms: int = Field(800, ge=100)
    max_utterance_s: float = Field(20.0, gt=1)
    prefill_question: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> TurnTakingSettings:
        if self.speculative_silence_ms and self.speculative_silence_ms >= self.min_silence_ms:
            raise ValueError("speculative_silence_ms must be shorter than min_silence_ms (or 0 to turn it off)")
        if self.pause_avatar_after_ms > self.min_interruption_ms:
            raise ValueError("pause_avatar_after_ms must not be longer than min_interruption_ms")
        return self


class ReplySettings(Strict):
    """How a reply is paced from the LLM's first words to the avatar's voice (conversation/replying.py)."""

    first_chunk_min_words: int = Field(3, ge=1)
    first_chunk_at_phrase: bool = True
    first_chunk_priority: bool = True
    trim_leading_silence: bool = True
    speak_ahead_s: float = Field(2.0, ge=0)  # 0: no limit


class MemorySettings(Strict):
    max_history_messages: int = Field(200, ge=2)


class EchoSettings(Strict):
    """Microphone sound that correlates with what the avatar just said is its own voice, not the user's."""

    guard: bool = True
    correlation: float = Field(0.45, gt=0, le=1)


class DeadlineSettings(Strict):
    """How long each engine may take before the turn fails with an error (and the session goes on)."""

    asr_s: float = Field(15.0, gt=0)
    llm_first_token_s: float = Field(20.0, gt=0)
    llm_next_token_s: float = Field(10.0, gt=0)
    tts_s: float = Field(10.0, gt=0)  # to a sentence's first audio, and between its pieces
    lipsync_s: float = Field(10.0, gt=0)  # to render one piece of speech
    knowledge_s: float = Field(3.0, gt=0)  # to retrieve the passages a question needs


class KnowledgeSettings(Strict):
    """Knowledge bases: documents the avatar answers from (engines/knowledge), one SQLite file per base in ``dir``."""

    dir: Path = Field(Path("~/.local/share/facecast/knowledge"), validate_default=True)
    # "embedded-minilm" (English), "embedded-multilingual" (16 languages), or a sentence-transformers BERT folder.
    model: str = "embedded-minilm"
    max_file_mb: float = Field(50, gt=0)
    chunk_words: int = Field(60, ge=20, le=180)  # all-MiniLM-L6-v2 reads at most 256 word pieces
    overlap_words: int = Field(15, ge=0)
    top_k: int = Field(3, ge=1, le=20)
    max_prompt_tokens: int = Field(600, ge=50)
    # Passages less similar to the question than this are no source; unset: the model's own threshold.
    min_relevance: float | None = Field(None, ge=-1, le=1)

    @field_validator("dir")
    @classmethod
    def _home(cls, folder: Path) -> Path:
        return folder.expanduser()

    @model_validator(mode="after")
    def _overlap_below_length(self) -> KnowledgeSettings:
        if self.overlap_words >= self.chunk_words:
            raise ValueError("overlap_words must be smaller than chunk_words")
        return self


class ApiSettings(Strict):
    """The model APIs any OpenAI client or OPEA service can call (http/openai_api.py, http/opea.py)."""

    # Their requests carry audio (base64 or multipart), so they may be larger than server.max_body_bytes.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_audio_s: float = Field(120.0, gt=0)  # longer audio is refused (400) before any model hears it
    max_text_chars: int = Field(4000, ge=1)  # of a text to speak, and of a chat request's messages together
    max_concurrent_renders: int = Field(1, ge=1)  # MP4s rendered at once (/v1/animation, /v1/avatarchatbot...)
    render_queue: int = Field(4, ge=0)  # renders that may wait for one of those; more get 503 with Retry-After
    outputs_dir: Path = PROJECT_ROOT / "outputs"  # where rendered MP4s go (OPEA's OUTFILE sets its folder)
    outputs_keep: int = Field(100, ge=1)  # the newest MP4s kept there; older ones are deleted
    job_timeout_s: float = Field(600.0, gt=0)  # in a cluster: how long a render job may take a worker


CLUSTER_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"


class ClusterSettings(Strict):
    """Several Facecast processes sharing a NATS server (media/cluster/); unset ``url``: one machine alone."""

    url: str | None = Field(None, pattern=r"^(nats|tls)://")  # or FACECAST_CLUSTER_URL, or --cluster
    name: str = Field("facecast", pattern=CLUSTER_NAME_PATTERN)  # subjects and buckets are namespaced by it
    node_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")  # default: host name and process id
    public_url: str | None = None  # how browsers and programs reach this node, shown in the registry
    # NATS credentials; each may also come from the environment: NATS_TOKEN, NATS_USER, NATS_PASSWORD, NATS_CREDS.
    token: str | None = None
    user: str | None = None
    password: str | None = None
    credentials_file: Path | None = None  # a .creds file (JWT and NKey seed); needs the nkeys package
    tls_ca: Path | None = None  # CA bundle to verify the NATS server; tls:// URLs use the system's without it
    tls_cert: Path | None = None  # client certificate for mutual TLS, with tls_key
    tls_key: Path | None = None
    heartbeat_s: float = Field(0.5, gt=0)  # how often each process publishes its registry entry
    registry_ttl_s: float = Field(3.0, gt=0)  # an entry not refreshed for this long is a process gone
    request_timeout_s: float = Field(5.0, gt=0)  # a forwarded offer or session API call
    lipsync: Literal["local", "remote"] = "local"  # "remote": lease a `facecast worker` for each speaking session
    lipsync_lease_timeout_s: float = Field(0.3, gt=0)  # how long a session waits for a worker to take it
    lipsync_chunk_deadline_s: float = Field(0.5, gt=0)  # a chunk later than this is rendered here instead
    lipsync_lease_idle_s: float = Field(30.0, gt=0)  # a worker forgets a lease unused this long
    worker_sessions: int = Field(2, ge=1)  # lip-sync sessions one worker renders at once
    job_attempts: int = Field(3, ge=1)  # a render job that fails (or loses its worker) this often is failed
    job_ack_wait_s: float = Field(30.0, gt=0)  # a job whose worker is silent this long goes to another
    job_retention_s: float = Field(86400.0, gt=0)  # how long finished jobs and their MP4s are kept
    conversation_ttl_s: float = Field(3600.0, gt=0)  # a conversation not continued this long is forgotten

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together: give both or neither")
        return self


class StageSettings(BaseModel):
    """``engine`` names the implementation; every other key is that engine's own option."""

    model_config = ConfigDict(extra="allow")
    engine: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


# A BCP-47 language tag as personas use them: "de", "en-US", "pt-BR", "zh-Hans".
LANGUAGE_TAG_PATTERN = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$"


class PersonaSettings(Strict):
    display_name: str
    system_prompt: str  # in the persona's language, like its examples
    examples: list[tuple[str, str]] = []
    voice: str | None = None  # unset: the TTS engine's voice for the language, else its default voice
    language: Annotated[str, StringConstraints(pattern=LANGUAGE_TAG_PATTERN)] = "en"
    # Each utterance's language is detected (a learner switching languages) and sent with its transcript.
    detect_language: bool = False
    greeting: str | None = None  # said when a session's events channel opens
    not_heard: str | None = None  # said when speech was heard but no words were recognised; unset: nothing
    # Besides the built-in ones of its language: the avatar repeats its last reply more slowly.
    slower_phrases: list[str] = []
    # The knowledge bases it answers from; unset: "default" when it exists; []: none.
    knowledge: list[str] | None = None


class ModelDownload(Strict):
    """A model `facecast models fetch NAME` downloads on request (never at run time)."""

    url: str
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    path: Path  # relative paths are under the project folder
    licence: str


class Settings(Strict):
    server: ServerSettings = ServerSettings()
    media: MediaSettings = MediaSettings()
    broadcast: BroadcastSettings = BroadcastSettings()
    turn_taking: TurnTakingSettings = TurnTakingSettings()
    reply: ReplySettings = ReplySettings()
    memory: MemorySettings = MemorySettings()
    echo: EchoSettings = EchoSettings()
    deadlines: DeadlineSettings = DeadlineSettings()
    api: ApiSettings = ApiSettings()
    cluster: ClusterSettings = ClusterSettings()
    knowledge: KnowledgeSettings = KnowledgeSettings()
    vad: StageSettings
    asr: StageSettings
    llm: StageSettings
    tts: StageSettings
    lipsync: StageSettings
    enhancer: StageSettings | None = None
    personas: dict[str, PersonaSettings]
    models: dict[str, ModelDownload] = {}

    @model_validator(mode="after")
    def _default_persona_exists(self) -> Settings:
        if self.server.default_persona not in self.personas:
            raise ValueError(
                f"server.default_persona {self.server.default_persona!r} is not one of the personas: "
                f"{', '.join(self.personas)}"
            )
        return self


# The former [turn] section, split by concern: where each of its keys lives now.
MOVED_TURN_KEYS = {
    **{key: f"turn_taking.{key}" for key in TurnTakingSettings.model_fields},
    **{key: f"reply.{key}" for key in ReplySettings.model_fields},
    "max_history_messages": "memory.max_history_messages",
    "echo_guard": "echo.guard",
    "echo_correlation": "echo.correlation",
}


def _refuse_moved_keys(tree: Mapping[str, Any]) -> None:
    turn = tree.get("turn")
    if isinstance(turn, Mapping):
        moves = ", ".join(f"turn.{key} is now {MOVED_TURN_KEYS.get(key, 'gone')}" for key in turn)
        raise ConfigError(f"the [turn] section was split into [turn_taking], [reply], [memory] and [echo]: {moves}")


# OPEA's environment names (GenAIComps' wav2lip service and the AvatarChatbot compose files), read where they
# mean the same thing here. They come right after config/default.toml: a config file, FACECAST__ variables
# and --set flags win over them.
OPEA_INFERENCE_MODES: dict[str, dict[str, Any]] = {
    "wav2lip_only": {"lipsync.engine": "wav2lip"},
    "wav2lip+gfpgan": {"lipsync.engine": "wav2lip", "enhancer.engine": "gfpgan"},
}


def _from_opea_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from OPEA's FACE (the default avatar), FPS, OUTFILE (its folder holds the MP4s),
    INFERENCE_MODE (Wav2Lip, with GFPGAN or without) and CHECKPOINT_PATH (the Wav2Lip checkpoint)."""
    given = {name: environ[name].strip() for name in ("FACE", "FPS", "OUTFILE", "INFERENCE_MODE") if environ.get(name)}
    found: dict[str, Any] = {}
    if "FACE" in given:
        found["server.default_avatar"] = given["FACE"]
    if "FPS" in given:
        found["media.fps"] = _parse_value(given["FPS"])
    if "OUTFILE" in given:
        found["api.outputs_dir"] = str(Path(given["OUTFILE"]).parent)
    if "INFERENCE_MODE" in given:
        mode = given["INFERENCE_MODE"]
        if mode not in OPEA_INFERENCE_MODES:
            modes = ", ".join(OPEA_INFERENCE_MODES)
            raise ConfigError(f"INFERENCE_MODE={mode[:40]!r} (OPEA's variable): use one of {modes}")
        found.update(OPEA_INFERENCE_MODES[mode])
        if environ.get("CHECKPOINT_PATH", "").strip():
            found["lipsync.checkpoint"] = environ["CHECKPOINT_PATH"].strip()
    return found


def _parse_value(text: str) -> Any:
    """A TOML literal where it parses as one (numbers, booleans, arrays), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[leaf] = value


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"config file {path} does not exist") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from error


def _switch_engines(tree: dict[str, Any], engines: Mapping[str, Any]) -> dict[str, Any]:
    """``tree`` where each stage that ``engines`` gives another engine keeps none of its former engine's
    options: ``[llm] engine = "openai"`` in a user file must not inherit the llama-cpp defaults."""
    switched = {
        stage: {}
        for stage, engine in engines.items()
        if isinstance(tree.get(stage), dict) and tree[stage].get("engine") != engine
    }
    return {**tree, **switched}


def _is_engine_key(dotted: str) -> bool:
    stage, _, key = dotted.partition(".")
    return bool(stage) and key == "engine"


def _with_settings(tree: dict[str, Any], dotted_values: Mapping[str, Any]) -> dict[str, Any]:
    """``tree`` with each ``section.key`` set; a stage given another engine first drops its former options."""
    engines = {dotted.split(".")[0]: value for dotted, value in dotted_values.items() if _is_engine_key(dotted)}
    tree = _switch_engines(tree, engines)
    for dotted, value in dotted_values.items():
        _set_path(tree, dotted, value)
    return tree


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, str] = {},
    environ: Mapping[str, str] = os.environ,
) -> Settings:
    tree = _read_toml(DEFAULT_CONFIG)
    tree = _with_settings(tree, _from_opea_environment(environ))
    if config_file is not None:
        user = _read_toml(config_file)
        engines = {
            stage: options["engine"]
            for stage, options in user.items()
            if isinstance(options, dict) and "engine" in options
        }
        tree = _merge(_switch_engines(tree, engines), user)
    from_environment = {
        name[len(ENV_PREFIX) :].lower().replace("__", "."): _parse_value(text)
        for name, text in environ.items()
        if name.startswith(ENV_PREFIX)
    }
    from_flags = {dotted: _parse_value(text) for dotted, text in overrides.items()}
    for source in (from_environment, from_flags):
        tree = _with_settings(tree, source)
    _refuse_moved_keys(tree)
    try:
        return Settings.model_validate(tree)
    except ValidationError as error:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"invalid configuration:\n{problems}") from error
