"""A VITS voice (Piper's models) cut in two, so its speech can start before a sentence is decoded.

A VITS model first turns phonemes into a latent sequence (text encoder, duration predictor, flow:
about a third of the time), then a HiFi-GAN decoder turns each latent frame into ``hop`` samples
(the other two thirds). The decoder is convolutional, so a window of latent frames with a few
frames of context either side decodes to the same samples as the whole sequence does
(``CONTEXT_FRAMES``: with 10, Piper's joe decodes to the same samples within float rounding). Decoding a short
first window and then longer ones puts the first audio out after the encoder and one short decode.

Plain onnx and onnxruntime: this module does not use piper (GPL-3.0), so the server's tests can
check it; only the piper worker process uses it with a voice. A model exported some other way
(no ``/dec/`` node names) is run whole, one chunk per clause.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
from onnx.utils import Extractor

# Latent frames of context decoded with each window and then cut away.
CONTEXT_FRAMES = 10
# The first window's latent frames (~0.28 s at Piper's hop of 256 samples and 22.05 kHz); each next
# window is twice the one before, so each is decoded well before the audio before it has played.
FIRST_WINDOW_FRAMES = 24
_DECODER_PREFIX = "/dec/"


@dataclass(frozen=True)
class VitsGraphs:
    """The front (phonemes to latent frames, and the frames each phoneme id lasts) and the decoder."""

    front: onnx.ModelProto
    decoder: onnx.ModelProto
    latent: str  # the decoder's input holding the latent frames (time on the last axis)
    durations: str | None  # frames per phoneme id, when the model has one such tensor


def split_vits(model: onnx.ModelProto) -> VitsGraphs | None:
    """The model cut in front of its decoder, or None when it is not a VITS export this understands."""
    graph = model.graph
    decoder_nodes = [node for node in graph.node if node.name.startswith(_DECODER_PREFIX)]
    if not decoder_nodes:
        return None
    produced = {name for node in decoder_nodes for name in node.output}
    initializers = {initializer.name for initializer in graph.initializer}
    decoder_inputs = list(
        dict.fromkeys(
            name
            for node in decoder_nodes
            for name in node.input
            if name and name not in produced and name not in initializers
        )
    )
    used_outside = {name for node in graph.node if not node.name.startswith(_DECODER_PREFIX) for name in node.input} | {
        output.name for output in graph.output
    }
    decoder_outputs = [name for name in produced if name in used_outside]
    first_conv = decoder_nodes[0]
    if len(decoder_outputs) != 1 or not decoder_inputs or first_conv.op_type != "Conv":
        return None
    latent = first_conv.input[0]
    if latent not in decoder_inputs:
        return None
    durations = _durations_tensor(model)
    graph_inputs = [tensor.name for tensor in graph.input if tensor.name not in initializers]
    extractor = Extractor(model)
    front = extractor.extract_model(graph_inputs, decoder_inputs + ([durations] if durations else []))
    decoder = extractor.extract_model(decoder_inputs, decoder_outputs)
    return VitsGraphs(front=front, decoder=decoder, latent=latent, durations=durations)


def _durations_tensor(model: onnx.ModelProto) -> str | None:
    """VITS rounds each phoneme id's predicted duration up (w_ceil): the only Ceil in the graph."""
    ceil_outputs = [name for node in model.graph.node if node.op_type == "Ceil" for name in node.output]
    return ceil_outputs[0] if len(ceil_outputs) == 1 else None


def open_vits(model: onnx.ModelProto, threads: int, hop: int) -> StreamingVits | WholeVits:
    """The model decoded window by window, or, when it cannot be split, whole."""
    graphs = split_vits(model)
    return WholeVits(model, threads, hop) if graphs is None else StreamingVits(graphs, threads)


def _session(model: onnx.ModelProto, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(
        model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )


def windows(frames: int, first: int | None = FIRST_WINDOW_FRAMES) -> Iterator[tuple[int, int]]:
    """(start, end) latent frames of each window: ``first`` frames, then each twice the one before; a
    remainder shorter than ``first`` joins the window before it. ``first=None``: one window."""
    if first is None:
        yield 0, frames
        return
    start, size = 0, first
    while start < frames:
        end = start + size
        if frames - end < first:
            end = frames
        yield start, end
        start, size = end, size * 2


class StreamingVits:
    """Runs the front once per clause and the decoder window by window."""

    can_stream = True

    def __init__(self, graphs: VitsGraphs, threads: int) -> None:
        self._graphs = graphs
        self._front = _session(graphs.front, threads)
        self._decoder = _session(graphs.decoder, threads)
        self._front_outputs = [output.name for output in self._front.get_outputs()]
        self.has_durations = graphs.durations is not None

    def encode(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The decoder's inputs for the whole clause, and the latent frames of each phoneme id (if known)."""
        values = dict(zip(self._front_outputs, self._front.run(None, feeds), strict=True))
        durations = values.pop(self._graphs.durations) if self._graphs.durations else None
        return values, None if durations is None else durations.reshape(-1)

    def frames(self, decoder_inputs: dict[str, np.ndarray]) -> int:
        return int(decoder_inputs[self._graphs.latent].shape[-1])

    def decode(self, decoder_inputs: dict[str, np.ndarray], start: int, end: int) -> np.ndarray:
        """Samples of latent frames [start, end), decoded with context either side."""
        latent = decoder_inputs[self._graphs.latent]
        first = max(0, start - CONTEXT_FRAMES)
        last = min(latent.shape[-1], end + CONTEXT_FRAMES)
        window = {**decoder_inputs, self._graphs.latent: latent[..., first:last]}
        audio = self._decoder.run(None, window)[0].reshape(-1)
        hop = len(audio) // (last - first)
        return audio[(start - first) * hop : (end - first) * hop]


class WholeVits:
    """A model this module cannot split, run whole: "encoding" makes all the audio, "decoding" cuts it."""

    can_stream = False
    _AUDIO = "audio"

    def __init__(self, model: onnx.ModelProto, threads: int, hop: int) -> None:
        self._hop = hop
        durations = _durations_tensor(model)
        if durations is not None and durations not in {output.name for output in model.graph.output}:
            model = onnx.ModelProto.FromString(model.SerializeToString())
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(durations))
        self._session = _session(model, threads)
        self.has_durations = durations is not None

    def encode(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        outputs = self._session.run(None, feeds)
        durations = outputs[1].reshape(-1) if self.has_durations else None
        return {self._AUDIO: outputs[0].reshape(-1)}, durations

    def frames(self, decoder_inputs: dict[str, np.ndarray]) -> int:
        return len(decoder_inputs[self._AUDIO]) // self._hop

    def decode(self, decoder_inputs: dict[str, np.ndarray], start: int, end: int) -> np.ndarray:
        audio = decoder_inputs[self._AUDIO]
        return audio[start * self._hop : len(audio) if end == self.frames(decoder_inputs) else end * self._hop]
