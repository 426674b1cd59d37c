"""Wav2Lip exported to ONNX for the CPU: float32 on ONNX Runtime, or int8 by static quantisation on OpenVINO.

The face encoder and the decoder are exported as two graphs, so a face's features are computed once per
avatar frame and the per-frame work is the decoder alone (audio encoder included). The int8 backend
quantises only the decoder with ONNX Runtime's quantiser (QDQ, weights int8 per output channel,
activations uint8 per tensor), calibrated on real inputs (``calibration.py``: face crops of an avatar
photo and the mel windows of recorded speech shipped with the project); OpenVINO runs that ONNX file, because its CPU plugin is the faster int8
runtime here (docs/benchmarks.md). The encoder stays float32: it runs once per avatar frame.

Exported and quantised models are cached on disk under the digest of the weights (and, for int8, of
the calibration data), written atomically, so a restart loads them in a second instead of re-exporting.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from engines.lipsync.wav2lip.backends.base import SKIP_NAMES, DecoderGraph, FaceEncoderGraph, Wav2LipBackend
from engines.lipsync.wav2lip.calibration import FACE_SIZE, Calibration, default_calibration
from engines.lipsync.wav2lip.mel import MEL_WINDOW
from engines.lipsync.wav2lip.model import Wav2LipGenerator

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "facecast" / "wav2lip"
CALIBRATION_BATCH = 8
ENCODE_BATCH = 16
OPSET = 18


def weights_sha256(model: Wav2LipGenerator) -> str:
    """Digest of the model's state dict (names, shapes, values): the same weights give the same cache."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- export and quantisation ---------------------------------------------------------------------------


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary_path)`` then rename, so a crash never leaves a half-written model in the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter warns about deprecations and absent torchvision ops that do not concern this model."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
            yield
    finally:
        logger.setLevel(level)


def _export(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], names: tuple[list[str], list[str]], path: Path
) -> None:
    input_names, output_names = names
    batch = torch.export.Dim("batch", min=1, max=1024)
    with _quiet_exporter():
        program = torch.onnx.export(
            module.eval(),
            args,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=tuple({0: batch} for _ in args),
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
            optimize=False,
        )
    _write_atomically(path, lambda temporary: program.save(temporary, external_data=False))


def export_float32(model: Wav2LipGenerator, directory: Path) -> tuple[Path, Path]:
    """The face encoder and the decoder as float32 ONNX files in ``directory`` (exported if missing)."""
    encoder_path, decoder_path = directory / "encoder.onnx", directory / "decoder.onnx"
    model = model.cpu().eval()
    faces = torch.rand(2, 6, FACE_SIZE, FACE_SIZE)
    if not encoder_path.is_file():
        _export(FaceEncoderGraph(model), (faces,), (["faces"], list(SKIP_NAMES)), encoder_path)
    if not decoder_path.is_file():
        with torch.inference_mode():
            skips = tuple(model.encode_faces(faces))
        mels = torch.rand(2, 1, 80, MEL_WINDOW)
        _export(DecoderGraph(model), (mels, *skips), (["mels", *SKIP_NAMES], ["faces_out"]), decoder_path)
    return encoder_path, decoder_path


class _CalibrationReader(CalibrationDataReader):
    """ONNX Runtime's CalibrationDataReader over decoder feeds built from real faces and mels."""

    def __init__(self, encoder: ort.InferenceSession, calibration: Calibration) -> None:
        self._features = encoder.run(None, {"faces": calibration.faces})
        self._mels = calibration.mels
        self._batches = self._feeds()

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self._mels), CALIBRATION_BATCH):
            frames = np.arange(start, min(start + CALIBRATION_BATCH, len(self._mels)))
            index = frames % len(self._features[0])
            yield {"mels": self._mels[frames], **{n: f[index] for n, f in zip(SKIP_NAMES, self._features)}}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_decoder(encoder_path: Path, decoder_path: Path, calibration: Calibration, output: Path) -> None:
    """Static int8 (QDQ) decoder: BatchNorm folded first, then quantised with ranges seen on ``calibration``."""
    reader = _CalibrationReader(_session(encoder_path, threads=2), calibration)

    def write(temporary: Path) -> None:
        with tempfile.TemporaryDirectory(dir=output.parent) as work:
            prepared = Path(work) / "prepared.onnx"
            quant_pre_process(str(decoder_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                prepared,
                temporary,
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"CalibTensorRangeSymmetric": False},
            )

    _write_atomically(output, write)


# --- runtime -------------------------------------------------------------------------------------------


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle workers sleep instead of spinning: the cores are shared with ASR, the LLM and TTS
    # (measured: spinning made int8 slower, not faster, on the loaded 2-core machine).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _OrtGraph:
    runtime = f"onnxruntime {ort.__version__}"

    def __init__(self, path: Path, threads: int) -> None:
        self._session = _session(path, threads)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(None, feeds)


class _OpenVinoGraph:
    """An ONNX file compiled by OpenVINO's CPU plugin. float32 precision is asked for explicitly: OpenVINO
    would otherwise run the layers left in float in bf16 on CPUs that have it."""

    def __init__(self, path: Path, threads: int) -> None:
        import openvino

        self.runtime = f"openvino {openvino.__version__}"
        core = openvino.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        self._model = core.compile_model(core.read_model(str(path)), "CPU", config)
        self._request = self._model.create_infer_request()
        self._lock = threading.Lock()  # one infer request: calls from several threads take turns

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            results = self._request.infer(feeds)  # outputs are copied out of the request's buffers
        return [results[output] for output in self._model.outputs]


class OnnxBackend(Wav2LipBackend):
    """An exported encoder and decoder on the CPU; features are seven float32 arrays, one row per face."""

    def __init__(
        self,
        name: str,
        encoder: _OrtGraph | _OpenVinoGraph,
        decoder: _OrtGraph | _OpenVinoGraph,
        about: dict[str, object],
    ) -> None:
        self.name = name
        self._encoder, self._decoder = encoder, decoder
        self._about = about

    def encode_faces(self, faces: np.ndarray) -> list[np.ndarray]:
        faces = np.ascontiguousarray(faces, dtype=np.float32)
        chunks = [self._encoder.run({"faces": faces[i : i + ENCODE_BATCH]}) for i in range(0, len(faces), ENCODE_BATCH)]
        return [np.concatenate(parts) for parts in zip(*chunks)]

    def generate(self, mels: np.ndarray, features: list[np.ndarray], index: np.ndarray) -> np.ndarray:
        feeds = {"mels": np.ascontiguousarray(mels, dtype=np.float32)}
        feeds.update((name, feature[index]) for name, feature in zip(SKIP_NAMES, features))
        return self._decoder.run(feeds)[0]

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "device": "cpu", "runtime": self._decoder.runtime, **self._about}


def create_onnx_backend(
    model: Wav2LipGenerator,
    quantized: bool,
    threads: int = 2,
    cache_dir: Path | None = None,
    calibration: Calibration | None = None,
) -> OnnxBackend:
    """Export (or load from the cache) and open the float32 (ONNX Runtime) or int8 (OpenVINO) backend."""
    weights = weights_sha256(model)
    directory = (cache_dir or DEFAULT_CACHE_DIR) / weights[:16]
    encoder_path, decoder_path = export_float32(model, directory)
    about: dict[str, object] = {"threads": threads, "weights_sha256": weights, "encoder": str(encoder_path)}
    if not quantized:
        graphs = _OrtGraph(encoder_path, threads), _OrtGraph(decoder_path, threads)
        return OnnxBackend("onnx", *graphs, {**about, "decoder": str(decoder_path), "precision": "float32"})
    calibration = calibration or default_calibration()
    int8_path = directory / f"decoder-int8-{calibration.digest()[:12]}.onnx"
    if not int8_path.is_file():
        quantize_decoder(encoder_path, decoder_path, calibration, int8_path)
    graphs = _OpenVinoGraph(encoder_path, threads), _OpenVinoGraph(int8_path, threads)
    precision = "int8 decoder (static, per-channel QDQ), float32 face encoder"
    return OnnxBackend("onnx-int8", *graphs, {**about, "decoder": str(int8_path), "precision": precision})
