"""How Facecast configures aiortc peer connections: ICE servers from the settings (and no others), and
what aiortc does not expose: how long received audio waits in the jitter buffer and where it is
decoded, the video encoder's settings (see RenderedVideoVp8Encoder), and tolerance of malformed
data-channel messages.

aiortc hands a received audio packet to the decoder only once four more have arrived, ~80 ms at
20 ms per packet. Every millisecond of it delays the VAD: the end of the user's turn, and the
moment a barge-in silences the avatar. Browsers adapt their playout delay to the network's jitter;
aiortc's is fixed, so Facecast sets it (``media.mic_jitter_buffer_packets``).
"""

from __future__ import annotations

import logging
import os
import queue
import struct

import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpCodecParameters
from aiortc.codecs import Decoder, get_decoder
from aiortc.codecs.vpx import Vp8Encoder, number_of_threads
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcsctptransport import WEBRTC_STRING, RTCSctpTransport
from av.frame import Frame
from av.video.codeccontext import VideoCodecContext

from media_server.config import Settings

log = logging.getLogger(__name__)
# As aiortc: a new context (and a keyframe) only when the sender's target bitrate moved by over 10 %.
BITRATE_CHANGE_TO_REOPEN = 0.1
KEYFRAME_MAX_INTERVAL = 3000  # frames; keyframes come when a receiver asks for one


def rtc_configuration(settings: Settings) -> RTCConfiguration:
    """The STUN/TURN servers of ``server.ice_servers``. None configured means none used: aiortc would
    otherwise ask Google's public STUN server for every session, and a self-hosted server makes no
    outbound request it was not told to."""
    ice = [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in settings.server.ice_servers]
    return RTCConfiguration(iceServers=ice)


_receive_data_channel = RTCSctpTransport._data_channel_receive


async def _tolerant_data_channel_receive(self: RTCSctpTransport, stream_id: int, pp_id: int, data: bytes) -> None:
    """aiortc decodes a string message as UTF-8 (and a channel-open request as structs) in its transport's own
    task, so one bad message from a client would end the transport, and the session with it. A string that
    is not UTF-8 is handed on as bytes instead (the session answers it as a bad message), and a malformed
    control message is dropped."""
    channel = self._data_channels.get(stream_id)
    if pp_id == WEBRTC_STRING and channel is not None:
        try:
            data.decode("utf8")
        except UnicodeDecodeError:
            channel.emit("message", bytes(data))
            return
    try:
        await _receive_data_channel(self, stream_id, pp_id, data)
    except (UnicodeDecodeError, AssertionError, struct.error, KeyError, ValueError):
        log.info("dropped a malformed data-channel message (stream %d, protocol %d)", stream_id, pp_id)


RTCSctpTransport._data_channel_receive = _tolerant_data_channel_receive


def set_audio_jitter_buffer(pc: RTCPeerConnection, track: MediaStreamTrack, packets: int) -> bool:
    """Hold at most ``packets`` packets of ``track`` before decoding; False if aiortc's internals moved."""
    for transceiver in pc.getTransceivers():
        if transceiver.receiver.track is track:
            buffer = getattr(transceiver.receiver, "_RTCRtpReceiver__jitter_buffer", None)
            if buffer is not None and hasattr(buffer, "_prefetch"):
                buffer._prefetch = packets
                return True
    log.warning("could not set the audio jitter buffer: this aiortc version keeps it elsewhere")
    return False


class DecodeOnTheLoop(queue.Queue):
    """Stands in for the queue of aiortc's decoder thread for one audio receiver. aiortc hands every
    received frame to a thread of its own to decode, and the decoded frame back to the event loop: for a
    microphone, two thread switches every 20 ms, per session, around a decode of some tens of
    microseconds. Here the frame is decoded where it arrives, on the event loop, and goes straight to the
    track. Only the end of the stream (None) still reaches aiortc's thread, idle until then, which ends
    the track as it always does."""

    def __init__(self, track: MediaStreamTrack) -> None:
        super().__init__()
        self._decoded = track._queue  # type: ignore[attr-defined]  # aiortc's RemoteStreamTrack
        self._decoder: tuple[str, Decoder] | None = None

    def put(
        self, item: tuple[RTCRtpCodecParameters, object] | None, block: bool = True, timeout: float | None = None
    ) -> None:
        if item is None:
            super().put(item, block, timeout)
            return
        codec, encoded_frame = item
        if self._decoder is None or self._decoder[0] != codec.name:
            self._decoder = (codec.name, get_decoder(codec))
        try:
            frames = self._decoder[1].decode(encoded_frame)  # type: ignore[arg-type]
        except av.FFmpegError as error:  # a corrupt packet: the decoder keeps its state for the next one
            log.debug("dropped an audio frame that does not decode: %s", error)
            return
        for frame in frames:
            self._decoded.put_nowait(frame)


def decode_audio_on_the_loop(pc: RTCPeerConnection, track: MediaStreamTrack) -> bool:
    """Decode the received audio ``track`` on the event loop (see DecodeOnTheLoop). Call it when the track
    arrives, before the connection starts its receiver; False if aiortc's internals moved (its own
    decoder thread then goes on decoding)."""
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        not_started = getattr(receiver, "_RTCRtpReceiver__decoder_thread", False) is None
        if receiver.track is track and not_started and hasattr(track, "_queue"):
            receiver._RTCRtpReceiver__decoder_queue = DecodeOnTheLoop(track)
            return True
    log.warning("could not decode received audio on the event loop: this aiortc version keeps its decoder elsewhere")
    return False


class RenderedVideoVp8Encoder(Vp8Encoder):
    """VP8 set up for rendered frames. aiortc's encoder is set up for a camera: its temporal denoiser
    smooths sensor noise that a rendered avatar does not have, and blurs the moving mouth with it. This
    one has no denoiser and a faster speed setting, and otherwise aiortc's rate control: constant
    bitrate at the sender's target, keyframes on request. On the default avatar (facecast bench video):
    1.5 dB higher PSNR at the same bitrate, 0.77x the encoding time."""

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        # Opened here, aiortc's encode() finds a context for this size and bitrate and keeps it.
        if self.codec is None or self._outdated(frame):
            self.codec = self._open(frame)
        return super().encode(frame, force_keyframe)

    def _outdated(self, frame: Frame) -> bool:
        codec = self.codec
        assert codec is not None
        bitrate_change = abs(self.target_bitrate - codec.bit_rate) / codec.bit_rate
        return frame.width != codec.width or frame.height != codec.height or bitrate_change > BITRATE_CHANGE_TO_REOPEN

    def _open(self, frame: Frame) -> VideoCodecContext:
        codec = av.CodecContext.create("libvpx", "w")
        codec.width, codec.height = frame.width, frame.height
        codec.bit_rate = self.target_bitrate
        codec.pix_fmt = "yuv420p"
        codec.gop_size = KEYFRAME_MAX_INTERVAL
        codec.qmin, codec.qmax = 2, 56
        bitrate = str(self.target_bitrate)
        codec.options = {
            "deadline": "realtime",
            "cpu-used": "-8",
            "noise-sensitivity": "0",
            "lag-in-frames": "0",
            "bufsize": bitrate,  # a one-second rate-control buffer
            "minrate": bitrate,  # minrate = maxrate = bitrate: constant bitrate
            "maxrate": bitrate,
            "undershoot-pct": "100",
            "overshoot-pct": "15",
            "static-thresh": "1",
            "partitions": "0",
        }
        codec.thread_count = number_of_threads(frame.width * frame.height, os.cpu_count() or 1)
        return codec


def use_rendered_video_encoder(pc: RTCPeerConnection, track: MediaStreamTrack) -> bool:
    """Have ``track``'s sender encode with RenderedVideoVp8Encoder if VP8 was negotiated. Call it after
    the remote offer is set and the track added, before the answer starts the sender."""
    for transceiver in pc.getTransceivers():
        if transceiver.sender.track is not track:
            continue
        codecs = getattr(transceiver, "_codecs", None)
        if codecs is not None and (not codecs or codecs[0].mimeType.lower() != "video/vp8"):
            return False  # H.264 (aiortc's encoder), or no video codec in common
        if codecs and getattr(transceiver.sender, "_RTCRtpSender__encoder", False) is None:
            transceiver.sender._RTCRtpSender__encoder = RenderedVideoVp8Encoder()
            return True
    log.warning("could not set the video encoder: this aiortc version keeps it elsewhere")
    return False
