"""A real aiortc peer that talks to a Facecast server the way a browser does.

The tests and ``facecast bench`` use it: it sends speech as its microphone (real time, 20 ms
Opus frames), sends and receives `events`, and records the avatar's audio and video. With
``microphone=False`` it only receives; ``watch`` attaches it to a broadcast session over WHEP.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections import deque
from dataclasses import dataclass, field

import aiohttp
import av
import cv2
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engines.audio import resample
from media_server.media.timeline import OpusEncoder
from media_server.media.webrtc import decode_audio_on_the_loop, set_audio_jitter_buffer

MIC_RATE = 48000
PACKET = 960  # 20 ms at 48 kHz
THUMBNAIL = 256
LOUD_RMS = 0.02  # speech, not Opus's comfort noise
MAX_SPEAKER_BACKLOG_S = 0.3


def _is_loud(samples: np.ndarray, threshold: float = LOUD_RMS) -> bool:
    return float(np.sqrt(np.mean(samples**2))) > threshold


class MicrophoneTrack(MediaStreamTrack):
    """Plays queued speech in real time, silence otherwise, and notes when each clip ended."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[np.ndarray] = deque()
        self._samples_sent = 0
        self._start: float | None = None
        self.clip_ended: list[float] = []  # time.monotonic() when the last sample of each clip was sent
        self.voice_started: list[float] = []  # time.monotonic() when each clip's first voiced packet was sent
        self._voice_pending = False
        # Sound from "the speakers" that leaks into this microphone: _echo[0] is heard at sample _echo_from.
        self._echo = np.zeros(0, np.float32)
        self._echo_from = 0

    def say(self, audio: np.ndarray, rate: int) -> float:
        """Queue a clip; returns its duration in seconds."""
        samples = resample(audio, rate, MIC_RATE)
        pad = (-len(samples)) % PACKET
        samples = np.concatenate([samples, np.zeros(pad, np.float32)])
        for offset in range(0, len(samples), PACKET):
            self._queue.append(samples[offset : offset + PACKET])
        self._voice_pending = True
        return len(samples) / MIC_RATE

    def leak(self, samples: np.ndarray, delay_s: float) -> None:
        """Sound received now reaches this microphone ``delay_s`` later (an echo path), as from speakers fed
        by a jitter buffer ``delay_s`` deep: the echo plays on from where it was while the buffer has sound,
        sound coming after it ran dry follows silence, and a burst queues, up to ``MAX_SPEAKER_BACKLOG_S``
        beyond the buffer's depth; past that the buffer drops its oldest sound, back to its depth."""
        if self._start is None:
            return  # the microphone is not capturing yet
        now = round((time.monotonic() - self._start) * MIC_RATE)
        depth = round(delay_s * MIC_RATE)
        if self._echo_from + len(self._echo) <= now:  # ran dry (or never played): buffer again
            self._echo, self._echo_from = np.zeros(0, np.float32), now + depth
        self._echo = np.concatenate([self._echo, samples.astype(np.float32)])
        queued = self._echo_from + len(self._echo) - now
        if queued > depth + round(MAX_SPEAKER_BACKLOG_S * MIC_RATE):
            self._echo = self._echo[queued - depth :]  # back to its depth at once: one skip, not many

    def _echo_in(self, first: int, count: int) -> np.ndarray:
        """The echo heard in samples [first, first + count) of the capture; what is older is dropped."""
        heard = np.zeros(count, np.float32)
        skip = max(0, first - self._echo_from)
        self._echo, self._echo_from = self._echo[skip:], self._echo_from + skip
        start = self._echo_from - first
        if start < count:
            taken = self._echo[: count - start]
            heard[start : start + len(taken)] = taken
            self._echo, self._echo_from = self._echo[len(taken) :], self._echo_from + len(taken)
        return heard

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._samples_sent / MIC_RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if self._queue:
            packet = self._queue.popleft()
            if self._voice_pending and _is_loud(packet):
                self._voice_pending = False
                self.voice_started.append(time.monotonic())
            if not self._queue:
                self.clip_ended.append(time.monotonic())
        else:
            packet = np.zeros(PACKET, np.float32)
        packet = packet + self._echo_in(self._samples_sent, PACKET)
        frame = av.AudioFrame.from_ndarray((packet * 32767).astype(np.int16)[None, :], format="s16", layout="mono")
        frame.sample_rate = MIC_RATE
        frame.pts = self._samples_sent
        frame.time_base = fractions.Fraction(1, MIC_RATE)
        self._samples_sent += PACKET
        return frame


class OpusPackets(MediaStreamTrack):
    """A microphone's frames, Opus-encoded here so the WebRTC sender only packs them. Left to aiortc,
    every 20 ms frame waits for a worker thread to encode it; on a starved event loop (this peer shares
    the server's, a browser does not) that falls behind real time and never catches up, and the
    microphone's sound, echo included, reaches the server later and later."""

    kind = "audio"

    def __init__(self, microphone: MicrophoneTrack) -> None:
        super().__init__()
        self.microphone = microphone
        self._encoder = OpusEncoder(MIC_RATE)
        self._ready: deque[av.Packet] = deque()

    async def recv(self) -> av.Packet:
        while not self._ready:
            frame = await self.microphone.recv()
            self._ready.extend(self._encoder.encode(frame.to_ndarray()[0], frame.pts))
        return self._ready.popleft()

    def stop(self) -> None:
        self.microphone.stop()
        super().stop()


@dataclass
class ReceivedVideo:
    at: float
    pts: int
    gray: np.ndarray  # THUMBNAIL x THUMBNAIL grayscale: enough to see a mouth move, small enough to keep
    size: tuple[int, int]


@dataclass
class Recording:
    audio: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (arrival, mono float32 at 48 kHz)
    video: list[ReceivedVideo] = field(default_factory=list)
    last_full_frame: np.ndarray | None = None
    # (arrival, media time in seconds) of every frame received, kept even when its content is not
    audio_times: list[tuple[float, float]] = field(default_factory=list)
    video_times: list[tuple[float, float]] = field(default_factory=list)

    def av_offset_s(self, since: float = 0.0) -> float | None:
        """How much later than the video the audio of the same instant arrived (median over the video frames
        received after ``since``), less the same figure at the first frames: 0 while A/V keep in step."""
        if len(self.audio_times) < 2 or len(self.video_times) < 2:
            return None
        audio_arrival, audio_media = np.array(self.audio_times).T
        video_arrival, video_media = np.array(self.video_times).T
        audio_media, video_media = audio_media - audio_media[0], video_media - video_media[0]
        lag = np.interp(video_media, audio_media, audio_arrival) - video_arrival
        recent = lag[video_arrival >= since]
        return float(np.median(recent) - np.median(lag[:25])) if recent.size else None

    def audio_between(self, start: float, end: float) -> np.ndarray:
        parts = [samples for at, samples in self.audio if start <= at < end]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def first_loud_audio_after(self, start: float, threshold: float = LOUD_RMS) -> float | None:
        for at, samples in self.audio:
            if at >= start and _is_loud(samples, threshold):
                return at
        return None

    def loud_audio_ended_after(self, start: float, quiet_s: float) -> float | None:
        """When the sound playing at ``start`` ended: the end of the last loud packet received before
        the first stretch of ``quiet_s`` without one (pauses between words are shorter)."""
        ended = start
        for at, samples in self.audio:
            if at < start:
                continue
            if at - ended >= quiet_s:
                return ended
            if _is_loud(samples):
                ended = at + len(samples) / MIC_RATE
        return None


class LoopbackClient:
    def __init__(
        self,
        base_url: str,
        *,
        keep_video: bool = True,
        keep_audio: bool = True,
        echo_gain: float = 0.0,
        echo_delay_s: float = 0.15,
        microphone: bool = True,
        audio_jitter_buffer_packets: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.sends_microphone = microphone
        self.audio_jitter_buffer_packets = audio_jitter_buffer_packets  # None: aiortc's own (4)
        self.keep_video = keep_video
        self.keep_audio = keep_audio
        self.echo_gain = echo_gain
        self.echo_delay_s = echo_delay_s
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates: no outbound STUN
        self.microphone = MicrophoneTrack()
        self.recording = Recording()
        self.events: list[tuple[float, dict]] = []
        self.session_id: str | None = None
        self.whep_resource: str | None = None  # the viewer's URL, after watch()
        self._channel = None
        self._opened = asyncio.Event()
        self._new_event = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []

    def _prepare_offer(self) -> None:
        if self.sends_microphone:
            self.pc.addTrack(OpusPackets(self.microphone))
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")
        self._channel = self.pc.createDataChannel("events")
        self._channel.on("open", self._opened.set)
        self._channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)

    async def connect(self, **choices: str) -> None:
        self._prepare_offer()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"sdp": self.pc.localDescription.sdp, "type": "offer", **choices}
        async with aiohttp.ClientSession() as http, http.post(f"{self.base_url}/offer", json=body) as response:
            answer = await response.json()
            if response.status != 200:
                raise RuntimeError(f"offer refused ({response.status}): {answer}")
        self.session_id = answer["session_id"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await asyncio.wait_for(self._opened.wait(), 20)

    async def watch(self, broadcast_id: str | None = None) -> None:
        """Attach as a receive-only WHEP viewer of a broadcast session (the server's default one if None)."""
        self.sends_microphone = False
        self._prepare_offer()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        url = f"{self.base_url}/whep" + (f"/{broadcast_id}" if broadcast_id else "")
        headers = {"Content-Type": "application/sdp"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, data=self.pc.localDescription.sdp, headers=headers) as response,
        ):
            answer = await response.text()
            if response.status != 201:
                raise RuntimeError(f"WHEP offer refused ({response.status}): {answer}")
            self.whep_resource = response.headers["Location"]
        self.session_id = broadcast_id
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.wait_for(self._opened.wait(), 20)

    def _on_message(self, message: str) -> None:
        self.events.append((time.monotonic(), json.loads(message)))
        self._new_event.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            decode_audio_on_the_loop(self.pc, track)
            if self.audio_jitter_buffer_packets is not None:
                set_audio_jitter_buffer(self.pc, track, self.audio_jitter_buffer_packets)
        self._readers.append(asyncio.create_task(self._read(track)))

    async def _read(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                now = time.monotonic()
                media_time = float(frame.pts * frame.time_base) if frame.pts is not None else now
                (self.recording.audio_times if track.kind == "audio" else self.recording.video_times).append(
                    (now, media_time)
                )
                if track.kind == "audio" and (self.keep_audio or self.echo_gain):
                    pcm = frame.to_ndarray().astype(np.float32) / 32768.0
                    channels = len(frame.layout.channels)
                    mono = pcm.reshape(-1, channels).mean(axis=1) if channels > 1 else pcm.reshape(-1)
                    if self.keep_audio:
                        self.recording.audio.append((now, mono))
                    if self.echo_gain:
                        self.microphone.leak(mono * self.echo_gain, self.echo_delay_s)
                elif track.kind == "video" and self.keep_video:
                    image = frame.to_ndarray(format="bgr24")
                    self.recording.last_full_frame = image
                    gray = cv2.cvtColor(cv2.resize(image, (THUMBNAIL, THUMBNAIL)), cv2.COLOR_BGR2GRAY)
                    self.recording.video.append(ReceivedVideo(now, frame.pts, gray, (image.shape[1], image.shape[0])))

    def send(self, event: dict) -> None:
        self._channel.send(json.dumps(event))

    async def wait_for(self, predicate, timeout: float = 30.0, after: float = 0.0) -> dict:
        """The first event received after ``after`` (monotonic) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            for at, event in self.events:
                if at >= after and predicate(event):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [e.get("type") for _, e in self.events[-15:]]
                raise TimeoutError(f"no matching event within {timeout} s; last events: {kinds}")
            self._new_event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new_event.wait(), remaining)

    def events_of(self, kind: str, after: float = 0.0) -> list[dict]:
        return [e for at, e in self.events if e.get("type") == kind and at >= after]

    async def close(self) -> None:
        for reader in self._readers:
            reader.cancel()
        await self.pc.close()
