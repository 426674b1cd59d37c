"""The echo guard on real speech: the avatar's own voice coming back is flagged, a user talking over it is not."""

from __future__ import annotations

import av
import numpy as np

from engines.audio import resample
from media_server.conversation.echo_guard import EchoGuard
from media_server.testing.speech_corpus import espeak

RATE = 16000
WINDOW = 512
TICK_48K = 1920  # one 40 ms tick of output audio
AVATAR_LINE = (
    "Once upon a time, a brave knight rode out to find the dragon of the northern hills, and he crossed three rivers."
)
USER_LINE = "Wait, stop please. Hold on a moment. Can you tell me about something else?"


def through_opus(audio_48k: np.ndarray, bit_rate: int = 32000) -> np.ndarray:
    """Encode and decode with libopus in 20 ms packets, as each WebRTC hop does."""
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format, encoder.bit_rate = 48000, "mono", "s16", bit_rate
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout = 48000, "mono"
    pcm = (np.clip(audio_48k, -1, 1) * 32767).astype(np.int16)
    decoded = []
    for start in range(0, len(pcm) - 959, 960):
        frame = av.AudioFrame.from_ndarray(pcm[None, start : start + 960], format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48000, start
        for packet in encoder.encode(frame):
            for out in decoder.decode(packet):
                samples = out.to_ndarray().reshape(-1)
                decoded.append(samples.astype(np.float32) / (32768.0 if samples.dtype == np.int16 else 1.0))
    return np.concatenate(decoded)


def flagged_share(microphone: np.ndarray, avatar: np.ndarray, rate: int, processed_late_s: float = 0.0) -> float:
    """Share of the microphone's voiced windows flagged as echo while the avatar plays ``avatar``; each
    window is processed ``processed_late_s`` after it was captured (a busy server)."""
    guard = EchoGuard(RATE)
    played = resample(avatar, rate, 48000)
    flags, position = [], 0
    for tick in range(len(played) // TICK_48K):
        guard.played(played[tick * TICK_48K : (tick + 1) * TICK_48K], at=tick * TICK_48K / 48000)
        while position + WINDOW <= (tick + 1) * RATE // 25 - processed_late_s * RATE:
            window = microphone[position : position + WINDOW]
            position += WINDOW
            guard.heard(window, captured_until=position / RATE)
            if np.sqrt(np.mean(window**2)) > 0.02:
                flags.append(guard.is_echo())
    assert len(flags) > 50
    return float(np.mean(flags))


def test_the_avatar_heard_back_late_and_quieter_is_echo_and_a_user_over_it_is_not() -> None:
    avatar, rate = espeak(AVATAR_LINE, "en-us", 160)
    user, user_rate = espeak(USER_LINE, "en-gb", 170)
    avatar_16k = resample(avatar, rate, RATE)
    delay = int(0.19 * RATE)  # network, playout and capture
    noise = np.random.default_rng(0).normal(0, 0.003, len(avatar_16k)).astype(np.float32)
    echo = np.concatenate([np.zeros(delay, np.float32), 0.5 * avatar_16k])[: len(avatar_16k)] + noise
    user_16k = np.zeros(len(avatar_16k), np.float32)
    spoken = resample(user, user_rate, RATE)[: len(user_16k)]
    user_16k[: len(spoken)] = spoken

    assert flagged_share(echo, avatar, rate) > 0.9
    assert flagged_share(user_16k, avatar, rate) < 0.1
    assert flagged_share(user_16k + 0.3 * echo, avatar, rate) < 0.2  # talking over the leaking echo


def test_the_avatar_heard_back_through_two_opus_hops_is_still_echo() -> None:
    avatar, rate = espeak(AVATAR_LINE, "en-us", 160)
    played = resample(avatar, rate, 48000)
    returned = through_opus(0.5 * through_opus(played))  # to the client, then back from its microphone
    delay = int(0.25 * 48000)
    echo = resample(np.concatenate([np.zeros(delay, np.float32), returned])[: len(played)], 48000, RATE)
    assert flagged_share(echo, avatar, rate) > 0.97


def test_echo_that_comes_back_more_than_a_second_late_is_still_echo() -> None:
    # A loaded machine or a slow network: the avatar's voice returns 1.3 s after it was sent.
    avatar, rate = espeak(AVATAR_LINE, "en-us", 160)
    avatar_16k = resample(avatar, rate, RATE)
    echo = np.concatenate([np.zeros(int(1.3 * RATE), np.float32), 0.5 * avatar_16k])[: len(avatar_16k)]
    assert flagged_share(echo, avatar, rate) > 0.9


def test_echo_processed_seconds_after_it_was_captured_is_still_echo() -> None:
    # The server is busy: the microphone's audio is handled 2.5 s late. The echo path itself is 0.25 s.
    avatar, rate = espeak(AVATAR_LINE, "en-us", 160)
    avatar_16k = resample(avatar, rate, RATE)
    echo = np.concatenate([np.zeros(int(0.25 * RATE), np.float32), 0.5 * avatar_16k])[: len(avatar_16k)]
    assert flagged_share(echo, avatar, rate, processed_late_s=2.5) > 0.9


def test_output_sent_after_a_pause_is_placed_at_its_time() -> None:
    # The avatar says one line, pauses 1 s (silence that is not recorded), and says another: the echo of
    # the second line is found, and is not matched against output sent after it was captured.
    first, first_rate = espeak(AVATAR_LINE, "en-us", 160)
    second, second_rate = espeak(USER_LINE, "en-gb", 170)
    guard = EchoGuard(RATE)
    sent_at = 0.0
    for line in (resample(first, first_rate, 48000)[: 2 * 48000], resample(second, second_rate, 48000)[: 2 * 48000]):
        for start in range(0, len(line) - TICK_48K + 1, TICK_48K):
            guard.played(line[start : start + TICK_48K], at=sent_at + start / 48000)
        resumed_at, sent_at = sent_at, sent_at + len(line) / 48000 + 1.0
    echo = resample(0.5 * line[48000 : 48000 + 9600], 48000, RATE)  # sent at resumed_at + 1.0 s
    guard.heard(echo, captured_until=resumed_at + 1.2 + 0.2)
    assert guard.is_echo()
    guard.heard(echo, captured_until=resumed_at + 0.5)  # captured before that sound was sent
    assert not guard.is_echo()


def test_echo_of_output_sent_in_a_burst_after_a_stall_is_still_echo() -> None:
    # The sender stalls 0.6 s, then sends its backlog at once and carries on in time. The speakers' jitter
    # buffer drops the backlog, too late to play, and plays every later packet 0.15 s after it was sent:
    # sooner than playing the burst out in full would have put it.
    avatar, rate = espeak(AVATAR_LINE, "en-us", 160)
    played, avatar_16k = resample(avatar, rate, 48000), resample(avatar, rate, RATE)
    stall_from, stall_packets, delay_s = 40, 30, 0.15
    packets = len(played) // 960
    sent_at = [
        (stall_from + stall_packets) * 0.02 if stall_from <= k < stall_from + stall_packets else k * 0.02
        for k in range(packets)
    ]
    echo = np.zeros(int((packets * 0.02 + 1) * RATE), np.float32)
    for k in range(packets):
        if not stall_from <= k < stall_from + stall_packets:
            at = round((sent_at[k] + delay_s) * RATE)
            echo[at : at + 320] = 0.5 * avatar_16k[k * 320 : (k + 1) * 320]
    guard, next_packet, position, flags = EchoGuard(RATE), 0, 0, []
    for step in range(1, int(len(echo) / RATE / 0.02)):
        now = step * 0.02
        while next_packet < packets and sent_at[next_packet] <= now:
            guard.played(played[next_packet * 960 : (next_packet + 1) * 960], at=sent_at[next_packet])
            next_packet += 1
        while position + WINDOW <= now * RATE:
            window = echo[position : position + WINDOW]
            position += WINDOW
            guard.heard(window, captured_until=position / RATE)
            if (
                position / RATE > (stall_from + stall_packets) * 0.02 + delay_s + 0.2
                and np.sqrt(np.mean(window**2)) > 0.02
            ):
                flags.append(guard.is_echo())
    assert len(flags) > 30 and np.mean(flags) > 0.9
