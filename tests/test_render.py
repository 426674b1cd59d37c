"""``facecast render``: a playable H.264 + AAC MP4 of the avatar speaking a recording, probed with PyAV."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from engines.lipsync.wav2lip.model import deterministic_state_dict
from media_server.cli import render as render_cli
from media_server.cli.render import RenderError, render
from media_server.config import Settings, load_settings
from media_server.testing.speech_corpus import espeak, write_wav

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "wav2lip"
FPS = 25


def probe(path: Path) -> dict[str, object]:
    """What a player sees: the streams, their codecs and durations, and every decoded frame."""
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        found = {
            "codecs": (video.codec_context.name, audio.codec_context.name),
            "size": (video.codec_context.width, video.codec_context.height),
            "video_s": float(video.duration * video.time_base),
            "audio_s": float(audio.duration * audio.time_base),
        }
        found["frames"] = [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]
    with av.open(str(path)) as container:
        samples = [frame.to_ndarray().reshape(-1) for frame in container.decode(audio=0)]
    found["samples"] = np.concatenate(samples)
    return found


def settings_for(engine: str, **options: str) -> Settings:
    overrides = {"lipsync.engine": engine} | {f"lipsync.{key}": value for key, value in options.items()}
    return load_settings(None, overrides, environ={})


@pytest.fixture(scope="module")
def reply(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    audio, rate = espeak("The capital of France is Paris.")
    path = write_wav(tmp_path_factory.mktemp("audio") / "reply.wav", audio, rate)
    return path, len(audio) / rate


def test_render_writes_a_playable_mp4_of_the_right_duration(tmp_path: Path, reply: tuple[Path, float]) -> None:
    audio_path, seconds = reply
    out = tmp_path / "out" / "reply.mp4"
    summary = render(settings_for("warp"), "default", audio_path, out, io.StringIO())
    assert summary.path == out and list(out.parent.iterdir()) == [out]  # no temporary file left beside it
    found = probe(out)
    assert found["codecs"] == ("h264", "aac") and found["size"] == (512, 512)
    assert abs(found["video_s"] - seconds) <= 0.1 and abs(found["audio_s"] - seconds) <= 0.1
    assert len(found["frames"]) == summary.frames == -(-int(seconds * 48000) // (48000 // FPS))
    assert abs(len(found["samples"]) / 48000 - seconds) <= 0.1
    loud = np.sqrt(np.mean(found["samples"] ** 2))
    assert loud > 0.02  # the speech itself, not silence
    mouths = np.array([frame[200:260, 220:300].mean() for frame in found["frames"]])
    assert mouths.std() > 1.0  # the mouth moves with it


def test_render_with_wav2lip(tmp_path: Path) -> None:
    state = deterministic_state_dict(FIXTURES / "wav2lip_state_dict.json")
    checkpoint = tmp_path / "wav2lip.pth"
    torch.save({"state_dict": {"module." + key: value for key, value in state.items()}}, checkpoint)
    audio, rate = espeak("Paris.")
    audio_path = write_wav(tmp_path / "short.wav", audio, rate)
    out = tmp_path / "wav2lip.mp4"
    summary = render(settings_for("wav2lip", checkpoint=str(checkpoint)), "default", audio_path, out, io.StringIO())
    found = probe(out)
    assert found["codecs"] == ("h264", "aac")
    assert abs(found["video_s"] - len(audio) / rate) <= 0.1 and len(found["frames"]) == summary.frames


def test_problems_are_reported_and_leave_no_file(tmp_path: Path, reply: tuple[Path, float], capsys) -> None:
    out = tmp_path / "reply.mp4"
    with pytest.raises(RenderError, match="no avatar 'nobody'"):
        render(settings_for("warp"), "nobody", reply[0], out, io.StringIO())
    not_audio = tmp_path / "noise.wav"
    not_audio.write_bytes(np.random.default_rng(0).bytes(5000))
    args = argparse.Namespace(avatar="default", audio=not_audio, out=out)
    with pytest.raises(SystemExit) as exit_info:
        render_cli.main(args, settings_for("warp"))
    assert exit_info.value.code == 2 and "could not be read as audio" in capsys.readouterr().err
    args = argparse.Namespace(avatar="default", audio=reply[0], out=out)
    with pytest.raises(SystemExit) as exit_info:
        render_cli.main(args, settings_for("wav2lip", checkpoint=str(tmp_path / "missing.pth")))
    assert exit_info.value.code == 2 and "facecast models fetch wav2lip" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [not_audio]
