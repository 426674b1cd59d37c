"""The `facecast` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from engines.embedded_models import WHISPER_BASE_SHA256


def facecast(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "media_server", *args], capture_output=True, text=True, timeout=timeout)


def test_doctor_reports_engines_models_hashes_device_and_codecs():
    result = facecast("doctor")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["engines"]["asr"]["sha256"] == WHISPER_BASE_SHA256
    assert report["engines"]["llm"]["sha256"] and report["engines"]["tts"]["voices"]["joe"]["sha256"]
    assert report["engines"]["llm"]["vocabulary"].startswith("common-english:")
    assert "enhancer" not in report["engines"]  # none configured
    assert report["device"]["picked"] == "cpu" and "no CUDA" in report["device"]["why"]
    assert "video/VP8" in report["codecs"]["video"] and "audio/opus" in report["codecs"]["audio"]
    assert report["avatars"]["default"]["size"] == [512, 512]


def test_a_bad_setting_stops_the_server_with_its_name():
    result = facecast("--set", "server.port=99999", "serve", timeout=60)
    assert result.returncode == 2
    assert "server.port" in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_engine_is_named_with_the_choices():
    result = facecast("--set", "asr.engine=nope", "doctor", timeout=60)
    assert result.returncode == 2
    assert "unknown asr engine 'nope'" in result.stderr and "faster-whisper" in result.stderr
