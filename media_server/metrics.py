"""Prometheus metrics of one server: sessions, turns, per-stage latency, frames."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)

# Stages of a turn, each measured from the end of the user's speech (or the typed message).
STAGES = ("transcript", "first_token", "first_clause", "first_tts_audio", "first_lipsync_frame", "first_audio_sent")


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Gauge("facecast_sessions", "Sessions open now", registry=self.registry)
        self.sessions_total = Counter("facecast_sessions_opened", "Sessions opened", registry=self.registry)
        self.turns = Counter("facecast_turns", "Turns answered", ["outcome"], registry=self.registry)
        self.stage_latency = Histogram(
            "facecast_stage_latency_seconds",
            "Time from the end of the user's speech to each stage of the reply",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.barge_in = Histogram(
            "facecast_barge_in_seconds",
            "Time from the start of the user's speech to the avatar falling silent",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.playback_gap = Histogram(
            "facecast_playback_gap_seconds",
            "Longest silence inside one reply caused by the pipeline falling behind playback",
            buckets=(0.0, 0.04, 0.08, 0.15, 0.3, 0.5, 1.0, 2.0),
            registry=self.registry,
        )
        self.frames_sent = Counter("facecast_frames_sent", "Video frames sent", registry=self.registry)
        self.frames_dropped = Counter("facecast_frames_dropped", "Frames dropped by a stalled consumer", registry=self.registry)
        self.late_ticks = Counter("facecast_late_ticks", "Output ticks that ran late", registry=self.registry)
        self.echo_windows = Counter(
            "facecast_echo_windows_ignored",
            "Microphone windows ignored as the avatar's own voice heard back through the client's speakers",
            registry=self.registry,
        )
        self.errors = Counter("facecast_session_errors", "Errors reported to sessions", ["code"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
