"""How Facecast configures aiortc peer connections: ICE servers from the settings, and a setting
aiortc does not expose, how long received audio waits in the jitter buffer.

aiortc hands a received audio packet to the decoder only once four more have arrived, ~80 ms at
20 ms per packet. Every millisecond of it delays the VAD: the end of the user's turn, and the
moment a barge-in silences the avatar. Browsers adapt their playout delay to the network's jitter;
aiortc's is fixed, so Facecast sets it (``media.mic_jitter_buffer_packets``).
"""

from __future__ import annotations

import logging

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack

from media_server.config import Settings

log = logging.getLogger(__name__)


def rtc_configuration(settings: Settings) -> RTCConfiguration:
    """The STUN/TURN servers of ``server.ice_servers`` (none: aiortc's defaults)."""
    ice = [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in settings.server.ice_servers]
    return RTCConfiguration(iceServers=ice or None)


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
