"""The timeline's Opus encoder: silence costs no encoding once it is steady, and speech is unharmed."""

from __future__ import annotations

import av
import numpy as np

from engines.audio import resample
from media_server.media.tracks import OpusEncoder
from media_server.testing.speech_corpus import espeak

RATE = 48000
PACKET = 960
OPUS_DELAY = 312  # libopus's lookahead at 48 kHz


def encode(encoder: OpusEncoder, stream: np.ndarray, *, every_packet: bool = False) -> list[av.Packet]:
    encode_one = encoder._encode if every_packet else encoder.encode
    return [
        packet
        for start in range(0, len(stream), PACKET)
        for packet in encode_one(stream[start : start + PACKET], start)
    ]


def decoded(packets: list[av.Packet]) -> np.ndarray:
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout = RATE, "mono"
    frames = [f.to_ndarray().reshape(-1) for p in packets for f in decoder.decode(av.Packet(bytes(p)))]
    return np.concatenate(frames).astype(np.float64)


def snr_db(reference: np.ndarray, received: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / np.sum((received - reference) ** 2)))


def test_steady_silence_is_sent_without_encoding_and_speech_after_it_is_unharmed() -> None:
    audio, rate = espeak("Hello there, how are you today?", "en-us", 160)
    speech = (resample(audio, rate, RATE) * 20000).astype(np.int16)
    speech = speech[: len(speech) // PACKET * PACKET]
    second = np.zeros(RATE, np.int16)
    stream = np.concatenate([second, speech, second, speech, second])
    encoder = OpusEncoder(RATE)
    packets = encode(encoder, stream)
    every_packet = encode(OpusEncoder(RATE), stream, every_packet=True)

    assert len(packets) == len(stream) // PACKET  # one packet per 20 ms, silence included
    raw = av.CodecContext.create("libopus", "w")  # libopus's own stamps, every packet encoded
    raw.sample_rate, raw.layout, raw.format, raw.bit_rate = RATE, "mono", "s16", encoder.codec.bit_rate
    raw.time_base = encoder.codec.time_base
    raw_stamps = []
    for start in range(0, len(stream), PACKET):
        frame = av.AudioFrame.from_ndarray(stream[None, start : start + PACKET], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, start, raw.time_base
        raw_stamps += [p.pts for p in raw.encode(frame)]
    assert [p.pts for p in packets] == raw_stamps  # as libopus stamps them,
    assert set(np.diff([p.pts for p in packets])) == {PACKET}  # 20 ms apart, silence or not
    assert all(np.array_equal(p.opaque, stream[i * PACKET : (i + 1) * PACKET]) for i, p in enumerate(packets))
    assert encoder.encoder_calls < 2 * len(speech) // PACKET + 3 * 5  # each silence: a few packets, then none

    ours, reference = decoded(packets), decoded(every_packet)
    assert np.abs(ours[OPUS_DELAY + 2 * PACKET : len(second)]).max() <= 2  # silence decodes as silence
    for start in (len(second), 2 * len(second) + len(speech)):  # speech after each silence
        source = stream[start : start + len(speech)].astype(np.float64)
        assert (
            snr_db(source, ours[start + OPUS_DELAY - 3 : start + len(speech) + OPUS_DELAY - 3])
            > snr_db(source, reference[start + OPUS_DELAY - 3 : start + len(speech) + OPUS_DELAY - 3]) - 0.5
        )
