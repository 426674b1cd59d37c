"""The video encoder sessions use: set up for rendered frames, and really used by the WebRTC sender."""

from __future__ import annotations

import asyncio
import time

from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.codecs.vpx import Vp8Encoder

from media_server.cli.bench.video import avatar_frames, encode_frames, mean_psnr
from media_server.http.state import SESSIONS
from media_server.media.tracks import OutputTrack
from media_server.media.webrtc import RenderedVideoVp8Encoder, use_rendered_video_encoder


def test_rendered_frames_come_back_sharper_than_with_a_cameras_settings_at_the_same_bitrate(runtime) -> None:
    engines, media = runtime.engines, runtime.settings.media
    frames = avatar_frames(engines.tts, engines.lipsync, runtime.avatars.get("default"), media)
    _, ours = encode_frames(RenderedVideoVp8Encoder(), frames, media.fps)
    _, cameras = encode_frames(Vp8Encoder(), frames, media.fps)
    assert mean_psnr(frames, ours) > mean_psnr(frames, cameras) + 0.5  # 1.5 dB on the default avatar
    assert sum(map(len, ours)) < 1.1 * sum(map(len, cameras))


async def test_a_session_sends_its_video_through_the_rendered_frames_encoder(client_factory, server_app) -> None:
    client = await client_factory()
    for _ in range(100):
        if client.recording.video:
            break
        await asyncio.sleep(0.05)
    assert client.recording.video, "no video frame decoded"
    session = server_app[SESSIONS].talks[client.session_id]
    sender = next(t.sender for t in session.pc.getTransceivers() if t.kind == "video")
    assert isinstance(sender._RTCRtpSender__encoder, RenderedVideoVp8Encoder)


async def test_a_keyframe_a_player_asks_for_while_the_avatar_is_still_comes_within_1_over_idle_fps(
    client_factory, server_app, runtime
) -> None:
    client = await client_factory()
    await asyncio.sleep(3.0)  # idle, with the first keyframe long gone
    session = server_app[SESSIONS].talks[client.session_id]
    encoder = next(t.sender for t in session.pc.getTransceivers() if t.kind == "video")._RTCRtpSender__encoder
    encode, keyframes = encoder.encode, []

    def noting_keyframes(frame, force_keyframe=False):  # the real encoder, watched
        if force_keyframe:
            keyframes.append(time.monotonic())
        return encode(frame, force_keyframe)

    encoder.encode = noting_keyframes
    receiver = next(t.receiver for t in client.pc.getTransceivers() if t.kind == "video")
    (source,) = receiver.getSynchronizationSources()
    asked = time.monotonic()
    await receiver._send_rtcp_pli(source.source)  # what a browser sends after losing a picture
    await asyncio.sleep(1 / runtime.settings.media.idle_fps + 0.5)
    assert keyframes and keyframes[0] - asked < 1 / runtime.settings.media.idle_fps + 0.2


async def encoder_for_an_offer_of(mime_type: str) -> object:
    """The encoder a server sender gets when the browser offers only ``mime_type`` for video."""
    browser, server = RTCPeerConnection(), RTCPeerConnection()
    try:
        transceiver = browser.addTransceiver("video", direction="recvonly")
        codecs = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences([c for c in codecs if c.mimeType == mime_type])
        await browser.setLocalDescription(await browser.createOffer())
        await server.setRemoteDescription(browser.localDescription)
        track = OutputTrack("video")
        server.addTrack(track)
        use_rendered_video_encoder(server, track)
        sender = next(t.sender for t in server.getTransceivers() if t.kind == "video")
        return sender._RTCRtpSender__encoder
    finally:
        await browser.close()
        await server.close()


async def test_only_a_vp8_session_gets_the_rendered_frames_encoder() -> None:
    assert isinstance(await encoder_for_an_offer_of("video/VP8"), RenderedVideoVp8Encoder)
    assert await encoder_for_an_offer_of("video/H264") is None  # aiortc creates its own H.264 encoder
