"""What each route of the route table takes and gives, for ``/openapi.json`` (http/openapi.py): one
``Operation`` per route, kept beside nothing else so the route table stays one line per API."""

from __future__ import annotations

from typing import Any

from media_server.http.openapi import Body, Limit, Operation, json_body
from media_server.service.speech import MAX_SPEED, MIN_SPEED

Schema = dict[str, Any]
TEXT: Schema = {"type": "string", "minLength": 1, "maxLength": Limit("api.max_text_chars")}
BASE64: Schema = {"type": "string", "description": "base64 of audio in any container FFmpeg decodes (WAV, MP3, ...)"}
NAME: Schema = {"type": "string"}
COUNT: Schema = {"type": "integer", "minimum": 1}
BINARY: Schema = {"type": "string", "format": "binary"}
ANY_OBJECT = json_body({"type": "object"})


def obj(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


CHOICES = {"avatar": NAME, "persona": NAME, "voice": NAME}
CLOSED = json_body(obj({"closed": NAME}, ("closed",)))
SESSION = obj(
    {
        "session_id": NAME,
        "avatar": NAME,
        "persona": NAME,
        "voice": NAME,
        "state": NAME,
        "viewers": {"type": "integer"},
        "rtmp": {"type": "array", "items": {"type": "object"}},
        "whep_url": NAME,
        "obs_url": NAME,
    },
    ("session_id", "state"),
)
SDP = Body("application/sdp", {"type": "string"}, "an SDP offer or answer")
SPOKEN_QUESTION = obj(
    {
        "audio": BASE64,
        "max_tokens": COUNT,
        "voice": {**NAME, "description": 'a TTS voice, or "default"'},
        "persona": NAME,
        "temperature": {"type": "number"},
        "top_p": {"type": "number"},
        "top_k": {"type": "integer"},
        "stream": {"type": "boolean"},
    },
    ("audio",),
)
OPEA_ANSWER = "The field names and shapes of OPEA's GenAIComps / GenAIExamples service of the same path."

# --- talk sessions and broadcasts ---------------------------------------------------------------------

OFFER = Operation(
    "Open a talk session: a browser's WebRTC offer, answered with the server's",
    "talk",
    json_body(obj({"sdp": NAME, "type": {"type": "string", "enum": ["offer"]}, **CHOICES}, ("sdp", "type"))),
    {200: json_body(obj({"sdp": NAME, "type": NAME, "session_id": NAME}, ("sdp", "type", "session_id")))},
)
DELETE_TALK = Operation("End a talk session", "talk", responses={200: CLOSED})
CREATE_BROADCAST = Operation(
    "Create a broadcast session (optionally pushed over RTMP)",
    "broadcast",
    json_body(obj({"id": NAME, "rtmp_url": NAME, **CHOICES})),
    {201: json_body(SESSION)},
)
LIST_BROADCASTS = Operation(
    "List the broadcast sessions",
    "broadcast",
    responses={200: json_body(obj({"sessions": {"type": "array", "items": SESSION}}))},
)
GET_BROADCAST = Operation("One broadcast session", "broadcast", responses={200: json_body(SESSION)})
DELETE_BROADCAST = Operation("Stop a broadcast session", "broadcast", responses={200: CLOSED})
SAY = Operation(
    "Have the avatar say a text, word for word",
    "broadcast",
    json_body(obj({"text": NAME}, ("text",))),
    {202: json_body(obj({"session_id": NAME, "speaking": {"type": "boolean"}}))},
)
CHAT = Operation(
    "Ask the avatar; answers once the reply's text is known (speech goes on)",
    "broadcast",
    json_body(obj({"text": NAME}, ("text",))),
    {
        200: json_body(
            obj({"session_id": NAME, "turn": {"type": "integer"}, "reply": NAME, "interrupted": {"type": "boolean"}})
        )
    },
)
INTERRUPT = Operation(
    "Stop what the avatar is saying", "broadcast", responses={200: json_body(obj({"session_id": NAME, "state": NAME}))}
)
START_RTMP = Operation(
    "Push the broadcast to an RTMP server too",
    "broadcast",
    json_body(obj({"rtmp_url": NAME}, ("rtmp_url",))),
    {201: json_body({"type": "object"})},
)
STOP_RTMP = Operation(
    "Stop the broadcast's RTMP pushes",
    "broadcast",
    responses={200: json_body(obj({"session_id": NAME, "stopped": {"type": "integer"}}))},
)
WHEP_OFFER = Operation(
    "Watch a broadcast (WHEP): an SDP offer, answered with the SDP answer and the viewer's Location",
    "watch",
    SDP,
    {201: SDP},
)
WHEP_STOP = Operation("Stop watching (WHEP)", "watch", responses={200: CLOSED})

# --- knowledge bases -----------------------------------------------------------------------------------

DOCUMENTS = Body(
    "multipart/form-data",
    obj({"files": {"type": "array", "items": BINARY}}, ("files",)),
    "PDF (with a text layer), Markdown, text or HTML files",
)
KNOWLEDGE_UPLOAD = Operation(
    "Add documents to a knowledge base (created if new); a bad file adds nothing",
    "knowledge",
    DOCUMENTS,
    {200: ANY_OBJECT},
)
DATAPREP_INGEST = Operation(
    "Add documents to the knowledge base index_name (OPEA's data prep; link_list is refused)",
    "knowledge",
    Body(
        "multipart/form-data",
        obj({"files": {"type": "array", "items": BINARY}, "index_name": NAME, "link_list": {"type": "string"}}),
    ),
    {200: ANY_OBJECT},
)
DATAPREP_GET = Operation(
    "The documents of the knowledge base index_name (OPEA's data prep)",
    "knowledge",
    json_body(obj({"index_name": NAME})),
    {200: json_body({"type": "array", "items": {"type": "object"}})},
)
DATAPREP_DELETE = Operation(
    'Remove a document ("all": every one) from the knowledge base index_name (OPEA\'s data prep)',
    "knowledge",
    json_body(obj({"file_path": NAME, "index_name": NAME}, ("file_path",))),
    {200: ANY_OBJECT},
)

# --- the cluster ---------------------------------------------------------------------------------------

CLUSTER_VIEW = Operation(
    "The cluster's nodes and workers: addresses, sessions, capacity, load (404 without a cluster)",
    "cluster",
    responses={200: json_body(obj({"nodes": {"type": "array", "items": {"type": "object"}}}, ("nodes",)))},
)
JOB_STATUS = Operation("A render job's state (queued, running, done, failed) and its error", "cluster", responses={200: ANY_OBJECT})
JOB_VIDEO = Operation("A finished render job's MP4", "cluster", responses={200: Body("video/mp4", BINARY)})

# --- about the server --------------------------------------------------------------------------------

OPTIONS = Operation("Avatars, personas, voices and ICE servers the pages offer", "server", responses={200: ANY_OBJECT})
AVATAR_MASK = Operation("An avatar cut out from its background", "server", responses={200: Body("image/png", BINARY)})
HEALTHZ = Operation("Whether the server is up (every engine loaded)", "server", responses={200: ANY_OBJECT})
METRICS = Operation("Prometheus metrics", "server", responses={200: Body("text/plain", {"type": "string"})})
OPENAPI = Operation("This document", "server", responses={200: ANY_OBJECT})

# --- OpenAI-compatible --------------------------------------------------------------------------------

MODELS = Operation(
    "The personas, as OpenAI models",
    "openai",
    responses={200: json_body(obj({"object": NAME, "data": {"type": "array", "items": obj({"id": NAME})}}))},
)
CHAT_COMPLETIONS = Operation(
    "A persona's reply to chat messages (model = a persona); stream: server-sent events",
    "openai",
    json_body(
        obj(
            {
                "model": {**NAME, "description": "a persona's name (GET /v1/models)"},
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "items": obj(
                        {
                            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                            "content": {"type": "string", "maxLength": Limit("api.max_text_chars")},
                        },
                        ("role", "content"),
                    ),
                },
                "stream": {"type": "boolean"},
                "max_tokens": COUNT,
                "max_completion_tokens": COUNT,
                "temperature": {"type": "number"},
            },
            ("model", "messages"),
        )
    ),
    {
        200: Body(
            "application/json",
            obj({"id": NAME, "object": NAME, "model": NAME, "choices": {"type": "array", "items": {"type": "object"}}}),
            "the reply; with stream: true, text/event-stream of chat.completion.chunk objects, then [DONE]",
        )
    },
)
TRANSCRIPTIONS = Operation(
    "Transcribe an audio file (any model name is accepted)",
    "openai",
    Body(
        "multipart/form-data",
        obj(
            {
                "file": BINARY,
                "model": NAME,
                "language": NAME,
                "response_format": {"type": "string", "enum": ["json", "text", "verbose_json"]},
            },
            ("file",),
        ),
    ),
    {200: json_body(obj({"text": NAME}, ("text",)))},
)
SPEECH = Operation(
    "Speak a text: WAV or raw PCM (16-bit mono, 24 kHz), streamed as it is synthesised",
    "openai",
    json_body(
        obj(
            {
                "input": TEXT,
                "model": NAME,
                "voice": NAME,
                "response_format": {"type": "string", "enum": ["wav", "pcm"]},
                "speed": {"type": "number", "minimum": MIN_SPEED, "maximum": MAX_SPEED},
            },
            ("input",),
        )
    ),
    {200: Body("audio/wav", BINARY, "audio/wav, or audio/pcm for pcm")},
)

# --- OPEA-compatible --------------------------------------------------------------------------------

ASR = Operation(
    "Transcribe base64 audio", "opea", json_body(obj({"audio": BASE64}, ("audio",))),
    {200: json_body(obj({"asr_result": NAME}, ("asr_result",)))}, OPEA_ANSWER,
)  # fmt: skip
TTS = Operation(
    "Speak a text: a base64 WAV", "opea", json_body(obj({"text": TEXT, "voice": NAME}, ("text",))),
    {200: json_body(obj({"tts_result": NAME}, ("tts_result",)))}, OPEA_ANSWER,
)  # fmt: skip
ANIMATION = Operation(
    "An MP4 of the avatar speaking base64 audio", "opea",
    json_body(obj({"byte_str": BASE64, "avatar": NAME}, ("byte_str",))),
    {200: json_body(obj({"video_path": NAME}, ("video_path",)))}, OPEA_ANSWER,
)  # fmt: skip
WAV2LIP = Operation(
    "An MP4 of the avatar speaking base64 audio", "opea", json_body(obj({"audio": BASE64, "avatar": NAME}, ("audio",))),
    {200: json_body(obj({"wav2lip_result": NAME}, ("wav2lip_result",)))}, OPEA_ANSWER,
)  # fmt: skip
AVATARCHATBOT = Operation(
    "A spoken question answered by the avatar: the MP4's path (ASR, LLM, TTS and lip-sync streaming into each other)",
    "opea", json_body(obj({**SPOKEN_QUESTION["properties"], "avatar": NAME}, ("audio",))),
    {200: json_body({"type": "string"}, "the MP4's path; Location: where to download it")}, OPEA_ANSWER,
)  # fmt: skip
AUDIOQNA = Operation(
    "A spoken question answered out loud: a base64 WAV", "opea", json_body(SPOKEN_QUESTION),
    {200: json_body({"type": "string"}, "the answer, a base64 WAV")}, OPEA_ANSWER,
)  # fmt: skip
HEALTH_CHECK = Operation("OPEA's health check", "opea", responses={200: ANY_OBJECT})
HEALTH = Operation("Health", "opea", responses={200: ANY_OBJECT})
OUTPUT = Operation("A rendered MP4", "opea", responses={200: Body("video/mp4", BINARY)})
