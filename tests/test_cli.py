"""The `facecast` command as a user runs it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from engines.embedded_models import WHISPER_BASE_SHA256
from media_server.cli.dependencies import CONSTRAINTS_FILE, pinned_versions

# Runs `facecast` with one more llm engine, "segfault", registered the way the registry names every engine.
WITH_SEGFAULTING_LLM = (
    "import sys; from engines.registry import IMPLEMENTATIONS; "
    "IMPLEMENTATIONS['llm']['segfault'] = 'tests.native_crash_engine:SegfaultingEngine'; "
    "from media_server.cli.main import main; main(sys.argv[1:])"
)


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


def test_doctor_reports_native_versions_and_this_install_is_the_tested_set():
    result = facecast("doctor")
    report = json.loads(result.stdout)
    native = report["dependencies"]["native"]
    tested = pinned_versions(CONSTRAINTS_FILE)
    for name in ("llama-cpp-python", "torch", "numpy", "onnxruntime", "openvino", "av", "ctranslate2"):
        assert native[name]["installed"] == native[name]["tested"] == tested[name]
    assert report["dependencies"]["untested"] == [] and report["warnings"] == []
    assert report["engines"]["llm"]["llama_cpp"].startswith(native["llama-cpp-python"]["installed"] + ": CPU")
    assert "avx2" in report["platform"]["cpu"]["features"]


def test_doctor_warns_before_loading_engines_of_a_native_package_ci_did_not_test(tmp_path: Path):
    constraints = tmp_path / "constraints.txt"
    pins = {**pinned_versions(CONSTRAINTS_FILE), "llama-cpp-python": "0.0.1"}
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
    result = facecast("doctor", "--constraints", str(constraints))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dependencies"]["untested"] == ["llama-cpp-python"]
    installed = report["dependencies"]["native"]["llama-cpp-python"]["installed"]
    assert f"llama-cpp-python {installed} is installed; Facecast was tested with 0.0.1" in report["warnings"][0]
    warned, loading = result.stderr.index("was tested with 0.0.1"), result.stderr.index("loading vad engine")
    assert warned < loading


def test_a_native_crash_while_loading_names_the_stage_and_its_stack():
    result = subprocess.run(
        [sys.executable, "-c", WITH_SEGFAULTING_LLM, "--set", "llm.engine=segfault", "serve"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == -signal.SIGSEGV
    stderr = result.stderr
    assert "asr engine 'faster-whisper' ready" in stderr
    crash = stderr.index("Fatal Python error: Segmentation fault")
    assert stderr.rindex("loading llm engine 'segfault'") < crash
    assert "native_crash_engine.py" in stderr[crash:] and "in build_engines" in stderr[crash:]


def test_an_engine_that_fails_to_load_is_named_without_a_traceback(tmp_path: Path):
    missing = tmp_path / "missing.gguf"
    result = facecast("--set", f"llm.model={missing}", "serve", timeout=120)
    assert result.returncode == 1
    assert f"facecast: the llm engine 'llama-cpp' failed to load: llm model '{missing}'" in result.stderr
    assert "Traceback" not in result.stderr
    doctor = facecast("--set", f"llm.model={missing}", "doctor", timeout=120)
    report = json.loads(doctor.stdout)  # still reports versions, CPU, codecs beside the engine's error
    assert report["engines"]["error"].startswith("the llm engine 'llama-cpp' failed to load")
    assert report["dependencies"]["native"]["llama-cpp-python"] and report["platform"]["cpu"]["features"]


def test_a_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = facecast("serve", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_setting_stops_the_server_with_its_name():
    result = facecast("--set", "server.port=99999", "serve", timeout=60)
    assert result.returncode == 2
    assert "server.port" in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_engine_is_named_with_the_choices():
    result = facecast("--set", "asr.engine=nope", "doctor", timeout=60)
    assert result.returncode == 2
    assert "unknown asr engine 'nope'" in result.stderr and "faster-whisper" in result.stderr
