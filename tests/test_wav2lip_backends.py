"""Wav2Lip backends against the conformance fixtures: ONNX float32 export, int8 quality, picking by name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.lipsync.wav2lip.backends import BackendError, Wav2LipBackend, create_backend
from engines.lipsync.wav2lip.calibration import (
    DEFAULT_CALIBRATION_IMAGE,
    Calibration,
    default_calibration,
    face_inputs,
    photo_face_crops,
    speech_mel_windows,
)
from engines.lipsync.wav2lip.model import Wav2LipGenerator, deterministic_state_dict
from media_server.testing.speech_corpus import espeak_16k

FIXTURES = Path(__file__).parent / "fixtures" / "wav2lip"
INT8_MIN_PSNR_DB = 40.0  # measured 47.3 dB with the conformance weights

torch.set_num_threads(2)


def _fixture(name: str) -> np.ndarray:
    return np.load(FIXTURES / name)


@pytest.fixture(scope="module")
def model() -> Wav2LipGenerator:
    generator = Wav2LipGenerator()
    generator.load_state_dict(deterministic_state_dict(FIXTURES / "wav2lip_state_dict.json"))
    return generator.eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wav2lip-cache")


@pytest.fixture(scope="module")
def onnx_float32(model: Wav2LipGenerator, cache_dir: Path) -> Wav2LipBackend:
    return create_backend("onnx", model, "cpu", cache_dir=cache_dir)


def _golden_max_error(backend: Wav2LipBackend) -> float:
    """Golden frame i pairs mel i with face i; ask for them in a shuffled order through ``index``."""
    order = np.array([2, 0, 3, 1])
    features = backend.encode_faces(_fixture("golden_faces.npy"))
    output = backend.generate(_fixture("golden_mels.npy")[order], features, order)
    assert output.shape == (4, 3, 96, 96) and output.dtype == np.float32
    return float(np.abs(output - _fixture("golden_output.npy")[order]).max())


def test_torch_cpu_backend_reproduces_golden_output(model: Wav2LipGenerator) -> None:
    assert _golden_max_error(create_backend("torch", model, "cpu")) <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_torch_cuda_backend_reproduces_golden_output(model: Wav2LipGenerator) -> None:
    try:
        assert _golden_max_error(create_backend("torch", model, "cuda")) <= 2e-3
    finally:
        model.cpu()


def test_onnx_float32_reproduces_golden_output(onnx_float32: Wav2LipBackend) -> None:
    assert _golden_max_error(onnx_float32) <= 2e-3


def test_exported_models_are_reused_from_the_cache(
    onnx_float32: Wav2LipBackend, model: Wav2LipGenerator, cache_dir: Path
) -> None:
    files = sorted(cache_dir.rglob("*"))
    written = {path: path.stat().st_mtime_ns for path in files if path.is_file()}
    assert {path.name for path in written} == {"encoder.onnx", "decoder.onnx"}
    again = create_backend("onnx", model, "cpu", cache_dir=cache_dir)
    assert {path: path.stat().st_mtime_ns for path in written} == written
    assert sorted(cache_dir.rglob("*")) == files
    assert _golden_max_error(again) <= 2e-3


def test_int8_output_stays_close_to_float32_on_held_out_speech(
    onnx_float32: Wav2LipBackend, model: Wav2LipGenerator, cache_dir: Path
) -> None:
    calibration = default_calibration()
    assert calibration.faces.shape == (8, 6, 96, 96) and calibration.mels.shape == (64, 1, 80, 16)
    # A quarter of the calibration frames keeps the test short; the PSNR measured the same (47.3 dB) with all.
    calibration = Calibration(calibration.faces, calibration.mels[::4])
    int8 = create_backend("onnx-int8", model, "cpu", cache_dir=cache_dir, calibration=calibration)
    assert int8.name == "onnx-int8"
    # Held out: a sentence, a voice and face crops that calibration never saw.
    mels = speech_mel_windows(espeak_16k((("Why do leaves change color in autumn?", "en-gb", 150),)))
    faces = face_inputs(photo_face_crops(DEFAULT_CALIBRATION_IMAGE, 4, seed=1))
    index = np.arange(len(mels)) % len(faces)
    reference = onnx_float32.generate(mels, onnx_float32.encode_faces(faces), index)
    quantized = int8.generate(mels, int8.encode_faces(faces), index)
    psnr = 10 * np.log10(1.0 / np.mean((quantized - reference) ** 2))
    assert psnr >= INT8_MIN_PSNR_DB, f"int8 PSNR {psnr:.1f} dB"


def test_unknown_backend_is_refused_with_the_choices(model: Wav2LipGenerator) -> None:
    with pytest.raises(BackendError, match=r"unknown Wav2Lip backend 'tensorrt': choose one of torch, onnx"):
        create_backend("tensorrt", model, "cpu")


def test_onnx_backends_refuse_other_devices(model: Wav2LipGenerator) -> None:
    with pytest.raises(BackendError, match="runs on the CPU"):
        create_backend("onnx-int8", model, "cuda")


@pytest.mark.skipif(importlib.util.find_spec("habana_frameworks") is not None, reason="a Gaudi host")
def test_hpu_backend_without_habana_says_what_is_missing(model: Wav2LipGenerator) -> None:
    with pytest.raises(BackendError, match=r"Intel Gaudi host .*habana_frameworks"):
        create_backend("hpu", model, "hpu")
