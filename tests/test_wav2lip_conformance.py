"""Our Wav2Lip generator and mel front end against the reference fixtures (tests/fixtures/wav2lip/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.lipsync.wav2lip.mel import StreamingMel, mel_window_start, melspectrogram
from engines.lipsync.wav2lip.model import (
    CheckpointError,
    Wav2LipGenerator,
    deterministic_state_dict,
    load_checkpoint,
)

FIXTURES = Path(__file__).parent / "fixtures" / "wav2lip"
STATE_DICT_JSON = FIXTURES / "wav2lip_state_dict.json"

torch.set_num_threads(2)


def _fixture(name: str) -> np.ndarray:
    return np.load(FIXTURES / name)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return deterministic_state_dict(STATE_DICT_JSON)


def _golden_max_error(model: Wav2LipGenerator) -> float:
    mels = torch.from_numpy(_fixture("golden_mels.npy"))
    faces = torch.from_numpy(_fixture("golden_faces.npy"))
    with torch.inference_mode():
        output = model(mels, faces).numpy()
    assert output.shape == (4, 3, 96, 96) and output.dtype == np.float32
    return float(np.abs(output - _fixture("golden_output.npy")).max())


def test_parameter_names_and_shapes_match_reference() -> None:
    reference = json.loads(STATE_DICT_JSON.read_text())
    expected = [(entry["key"], tuple(entry["shape"])) for entry in reference["state_dict"]]
    model = Wav2LipGenerator()
    assert [(key, tuple(tensor.shape)) for key, tensor in model.state_dict().items()] == expected
    assert sum(parameter.numel() for parameter in model.parameters()) == reference["parameters"]


def test_deterministic_weights_reproduce_golden_output(weights: dict[str, torch.Tensor]) -> None:
    model = Wav2LipGenerator()
    model.load_state_dict(weights)
    assert _golden_max_error(model.eval()) <= 1e-4


def test_mel_matches_reference() -> None:
    mel = melspectrogram(_fixture("mel_input_wav_16k.npy"))
    reference = _fixture("mel_reference.npy")
    assert mel.shape == reference.shape == (80, 161) and mel.dtype == np.float32
    assert np.abs(mel - reference).max() <= 2e-3


def test_golden_mel_windows_come_from_the_reference_mel() -> None:
    reference = _fixture("mel_reference.npy")
    windows = _fixture("golden_mels.npy")
    for i in range(4):
        np.testing.assert_array_equal(windows[i, 0], reference[:, 8 * i : 8 * i + 16])


def test_mel_window_start_for_25_fps() -> None:
    assert [mel_window_start(i) for i in range(7)] == [0, 3, 6, 9, 12, 16, 19]


@pytest.mark.parametrize("seed", range(4))
def test_streaming_mel_equals_offline(seed: int) -> None:
    rng = np.random.default_rng(seed)
    wav = _fixture("mel_input_wav_16k.npy")[: int(rng.integers(0, 32000))]
    stream = StreamingMel()
    pieces, received = [], 0
    while received < len(wav):
        size = int(rng.integers(1, 900))
        pieces.append(stream.push(wav[received : received + size]))
        received = min(received + size, len(wav))
        offline_frames = 1 + received // 200
        expected_held_back = 2 if received >= 401 else offline_frames
        assert offline_frames - stream.frames_emitted == expected_held_back
    pieces.append(stream.finish())
    streamed = np.concatenate(pieces, axis=1)
    offline = melspectrogram(wav)
    assert streamed.shape == offline.shape
    np.testing.assert_allclose(streamed, offline, rtol=0, atol=1e-6)


def test_public_checkpoint_layout_loads(weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "wav2lip.pth"
    state_dict = {"module." + key: tensor for key, tensor in weights.items()}
    torch.save({"state_dict": state_dict, "optimizer": {"state": {}, "param_groups": []}, "global_step": 1}, path)
    model = load_checkpoint(path, "cpu")
    assert not model.training
    assert _golden_max_error(model) <= 1e-4


def test_bare_state_dict_loads(weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "bare.pth"
    torch.save(weights, path)
    loaded = load_checkpoint(path, "cpu").state_dict()
    assert all(torch.equal(loaded[key], tensor) for key, tensor in weights.items())


def test_missing_key_is_named(weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "missing.pth"
    torch.save({"state_dict": {k: v for k, v in weights.items() if k != "audio_encoder.3.conv_block.1.bias"}}, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): audio_encoder\.3\.conv_block\.1\.bias"):
        load_checkpoint(path, "cpu")


def test_wrong_shape_is_named(weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "wrong_shape.pth"
    torch.save({"state_dict": {**weights, "output_block.1.weight": torch.zeros(3, 32, 3, 3)}}, path)
    expected = r"output_block\.1\.weight: checkpoint \(3, 32, 3, 3\), model \(3, 32, 1, 1\)"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path, "cpu")
