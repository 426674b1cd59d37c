"""The GFPGAN face enhancer: it computes what the reference computes, loads a checkpoint saved like the
published GFPGANv1.4.pth, and restores the Wav2Lip face before it is pasted. Real models; on this CPU
one 512x512 face takes seconds, so the tests restore as few faces as they can."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engines.audio import resample
from engines.avatar import Avatar, load_avatar
from engines.base import EngineConfigError
from engines.enhancer.gfpgan.engine import GFPGANEnhancer
from engines.enhancer.gfpgan.model import GFPGAN, GFPGANConfig
from engines.lipsync.wav2lip.model import deterministic_state_dict
from engines.registry import create_engine
from media_server.testing.speech_corpus import espeak

FIXTURES = Path(__file__).resolve().parent / "fixtures"
AVATAR_DIR = Path(__file__).resolve().parents[1] / "avatars" / "default"
FPS, RATE = 25, 48000


def deterministic(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixture's weight rule (tests/fixtures/gfpgan/README.md)."""
    rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    n = int(np.prod(shape))
    if ".noises." in key:
        values = rng.standard_normal(n)
    elif key.endswith("modulation.bias"):
        values = rng.uniform(0.5, 1.5, n)
    elif len(shape) == 5:
        values = rng.standard_normal(n) / np.sqrt(np.prod(shape[2:]))
    elif len(shape) >= 2:
        values = rng.standard_normal(n) / np.sqrt(np.prod(shape[1:]))
    else:
        values = rng.uniform(-0.1, 0.1, n)
    return torch.from_numpy(values.reshape(shape).astype(np.float32))


def test_parameter_names_and_shapes_are_those_of_the_published_checkpoint() -> None:
    expected = json.loads((FIXTURES / "gfpgan" / "gfpgan_v1.4_state_dict.json").read_text())
    assert [[key, list(value.shape)] for key, value in GFPGAN().state_dict().items()] == expected


def test_output_equals_the_reference_under_deterministic_weights() -> None:
    model = GFPGAN(GFPGANConfig(out_size=32, style_features=32, narrow=0.125)).eval()
    model.load_state_dict({key: deterministic(key, tuple(v.shape)) for key, v in model.state_dict().items()})
    faces = torch.from_numpy(np.load(FIXTURES / "gfpgan" / "small_faces.npy"))
    with torch.inference_mode():
        restored = model(faces).numpy()
    np.testing.assert_allclose(restored, np.load(FIXTURES / "gfpgan" / "small_output.npy"), atol=1e-4)


@pytest.fixture(scope="module")
def gfpgan_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved the way GFPGANv1.4.pth is: the weights under ``params_ema`` (torch's initialisation, seeded)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gfpgan") / "GFPGANv1.4.pth"
    torch.save({"params_ema": GFPGAN().state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def enhancer(gfpgan_checkpoint: Path) -> GFPGANEnhancer:
    engine = create_engine("enhancer", "gfpgan", {"checkpoint": str(gfpgan_checkpoint), "device": "cpu"})
    assert isinstance(engine, GFPGANEnhancer)
    return engine


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return load_avatar(AVATAR_DIR)


def test_a_face_comes_back_restored_at_its_own_size_and_the_same_every_time(enhancer: GFPGANEnhancer) -> None:
    face = np.ascontiguousarray(cv2.imread(str(AVATAR_DIR / "portrait.jpg"))[120:330, 150:340])
    restored = enhancer.enhance(face)
    assert restored.shape == face.shape and restored.dtype == np.uint8
    assert np.abs(restored.astype(int) - face).mean() > 1.0
    # The decoder's stored noise, not fresh noise: consecutive video frames must not flicker.
    assert np.array_equal(enhancer.enhance(face), restored)


def test_wav2lip_pastes_the_restored_face_and_nothing_else_changes(
    enhancer: GFPGANEnhancer, avatar: Avatar, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "wav2lip.pth"
    torch.save({"state_dict": deterministic_state_dict(FIXTURES / "wav2lip" / "wav2lip_state_dict.json")}, checkpoint)
    speech, rate = espeak("Hi.", words_per_minute=190)
    one_frame = resample(speech, rate, RATE)[int(0.1 * RATE) : int(0.1 * RATE) + RATE // FPS]

    def first_frame(with_enhancer: bool) -> np.ndarray:
        engine = create_engine("lipsync", "wav2lip", {"checkpoint": str(checkpoint), "warp": {"seed": 5}})
        if with_enhancer:
            engine.use_enhancer(enhancer)
        stream = engine.open_stream(avatar, FPS, RATE)
        stream.push_audio(one_frame)
        stream.end_segment()
        frames = stream.pull()
        assert len(frames) == 1
        return frames[0].video

    plain, restored = first_frame(False), first_frame(True)
    changed = np.abs(plain.astype(int) - restored).max(axis=2) > 0
    face = avatar.face_boxes[0]
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 200
    # Only inside the pasted mouth region, which lies within the padded face box.
    margin = 0.1 * face.width  # the idle animation moves the head a little
    assert face.x0 - margin <= xs.min() and xs.max() <= face.x1 + margin
    assert face.y0 - margin <= ys.min() and ys.max() <= face.y1 + 0.2 * face.height + margin


def test_the_warp_engine_refuses_an_enhancer(enhancer: GFPGANEnhancer) -> None:
    with pytest.raises(EngineConfigError, match="generates no face to enhance"):
        create_engine("lipsync", "warp", {}).use_enhancer(enhancer)


def test_a_missing_or_foreign_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(EngineConfigError, match="facecast models fetch gfpgan"):
        create_engine("enhancer", "gfpgan", {"checkpoint": str(tmp_path / "none.pth")})
    foreign = tmp_path / "other.pth"
    torch.save({"params_ema": {"conv.weight": torch.zeros(3, 3, 1, 1)}}, foreign)
    with pytest.raises(EngineConfigError, match="not a GFPGAN v1.4"):
        create_engine("enhancer", "gfpgan", {"checkpoint": str(foreign)})
