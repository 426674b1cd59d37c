"""Fan-out: one avatar output watched by any number of receive-only viewers.

A pump drains the output's two tracks all the time and offers a copy of every frame to each viewer's
own pair of bounded tracks. aiortc's MediaRelay does not fit: it starts reading only when the first
viewer does, so that viewer first gets a backlog of stale frames; it hands one frame object to every
viewer's encoder thread at once, which crashes PyAV (see ``copier``); and its buffered queues are
unbounded, so one stalled viewer grows memory. Here a viewer joins at the live edge and a slow one
drops only its own frames. Every viewer's peer connection encodes its own video: the viewer limit
bounds that cost.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterable

import av
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from media_server.media.tracks import OutputTrack
from media_server.media.webrtc import use_rendered_video_encoder


def copier(frame: av.Packet | av.VideoFrame) -> Callable[[], av.Packet | av.VideoFrame]:
    """Copies of ``frame``, one per viewer: each viewer's encoder runs in its own thread and changes the frame
    it encodes (time base, picture type, a cached converter), and a PyAV frame is not safe to share that way.
    Video is converted to the encoders' yuv420p once, here, rather than once per viewer; audio comes
    already encoded, and every viewer sends the same Opus packets."""
    if isinstance(frame, av.VideoFrame):
        pixels = frame.to_ndarray(format="yuv420p")

        def make() -> av.Packet | av.VideoFrame:
            return av.VideoFrame.from_ndarray(pixels, format="yuv420p")
    else:
        payload = bytes(frame)

        def make() -> av.Packet | av.VideoFrame:
            return av.Packet(payload)

    def copy() -> av.Packet | av.VideoFrame:
        made = make()
        made.pts, made.time_base = frame.pts, frame.time_base
        return made

    return copy


class Viewer:
    """One receive-only peer: its own tracks (fed by the session's pump) and, if it asked, an `events` channel."""

    def __init__(self, configuration: RTCConfiguration) -> None:
        self.id = uuid.uuid4().hex
        self.pc = RTCPeerConnection(configuration)
        self.tracks = {"audio": OutputTrack("audio"), "video": OutputTrack("video")}
        self.channel: RTCDataChannel | None = None
        self.created = time.monotonic()

    def send(self, message: str) -> None:
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            channel.send(message)

    async def close(self) -> None:
        for track in self.tracks.values():
            track.stop()
        with contextlib.suppress(Exception):
            await self.pc.close()

    async def answer(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """Answer a receive-only offer with this viewer's tracks, for the kinds it asks to receive."""
        await self.pc.setRemoteDescription(offer)
        kinds = {transceiver.kind for transceiver in self.pc.getTransceivers()} & {"audio", "video"}
        if not kinds:
            raise ValueError("the offer has neither audio nor video to receive")
        for kind in sorted(kinds):
            self.pc.addTrack(self.tracks[kind])
        if "video" in kinds:
            use_rendered_video_encoder(self.pc, self.tracks["video"])
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription

    @property
    def dropped(self) -> int:
        return self.tracks["audio"].dropped + self.tracks["video"].dropped


async def pump(source: OutputTrack, viewers: Callable[[], Iterable[Viewer]]) -> None:
    """Offer a copy of every frame of ``source`` to each of ``viewers()``, until the source stops."""
    while True:
        try:
            frame = await source.recv()
        except MediaStreamError:
            return
        watching = list(viewers())
        if watching:
            copy = copier(frame)
            for viewer in watching:
                viewer.tracks[source.kind].offer(copy())
