"""The espeak-ng worker process: the only Facecast code that loads libespeak-ng.

espeak-ng is GPL-3.0 and Facecast is Apache-2.0, so the library is never loaded into the server
process: ``engines.tts.espeak.engine`` starts this module as
``python -m engines.tts.espeak.worker CONFIG_JSON`` and talks to it over pipes (the protocol is in
``engines.tts.worker_loop``). CONFIG_JSON is ``{"library": path or soname, "data": espeak-ng-data
folder or null (the library's own), "voices": [voice name, ...], "words_per_minute": int}``.

Its ready message says what it loaded:

    {"event": "ready", "version": "1.52.0", "data": "/.../espeak-ng-data", "sample_rate": 22050,
     "languages": ["af", "am", ...],            # each voice in the data, by its first language
     "voices": {"de": {"name": "German", "identifier": "gmw/de", "languages": [["de", 5], ...]}},
     "unknown_voices": ["xx"]}                  # configured names the data has no voice for

A voice name is what ``espeak-ng -v`` takes ("de", "en-us", "de+f3") or a language tag espeak-ng
matches to its best voice ("zh", "es-MX"). Each clause of a text is synthesised on its own
(``espeak_Synth`` in synchronous mode) and sent at once, so a reply's first words go out before
the rest is synthesised; the audio is espeak-ng's, 16-bit at 22050 Hz, as float32, trimmed of nothing.
"""

from __future__ import annotations

import ctypes
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.tts.worker_loop import Piece, claim_stdout, serve_forever, split_sentences

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 0x1
_END_PAUSE = 0x1000  # keep the pause after the clause's last word, as if more text followed
_RATE = 1
_OK = 0
_BUFFER_MS = 100
_MIN_WORDS_PER_MINUTE, _MAX_WORDS_PER_MINUTE = 80, 450

# Besides split_sentences' breaks: sentence ends that no space follows (Chinese, Japanese), and
# ones that do in other scripts (Arabic question mark, Devanagari danda).
_SENTENCE_BREAK = re.compile(r"(?<=[。！？])\s*|(?<=[؟।])\s+")
# A clause ends at a comma, semicolon or colon before whitespace ("3,5" and "10:30" stay whole),
# or at a full-width one.
_CLAUSE_BREAK = re.compile(r"(?<=[,;:،])\s+|(?<=[，、；：])")


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # (priority byte, NUL-terminated language) pairs, then a 0 byte
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    identifier: str
    languages: list[tuple[str, int]]  # language and priority (lower: a better match)


def _languages(address: int | None) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    while address and (priority := ctypes.string_at(address, 1)[0]):
        language = ctypes.string_at(address + 1)
        found.append((language.decode("utf-8", "replace"), priority))
        address += len(language) + 2
    return found


def _voice_info(voice: _Voice) -> VoiceInfo:
    return VoiceInfo(
        name=(voice.name or b"").decode("utf-8", "replace").strip(),
        identifier=(voice.identifier or b"").decode("utf-8", "replace"),
        languages=_languages(voice.languages),
    )


def _parts(pattern: re.Pattern[str], text: str) -> list[str]:
    return [part.strip() for part in pattern.split(text) if part.strip()]


def split_clauses(text: str) -> Iterator[tuple[str, list[str]]]:
    """Each sentence of ``text`` with its clauses, in order."""
    for whitespace_sentence in split_sentences(text):
        for sentence in _parts(_SENTENCE_BREAK, whitespace_sentence):
            yield sentence, _parts(_CLAUSE_BREAK, sentence)


class Espeak:
    """libespeak-ng, driven through its C API in synchronous mode."""

    def __init__(self, library: str, data: str | None) -> None:
        self._lib = ctypes.CDLL(library)
        self._declare()
        self.sample_rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, data.encode() if data else None, 0
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak-ng could not load its data ({data or 'the library default'})")
        self._samples: list[np.ndarray] = []
        self._callback = _SynthCallback(self._receive)  # kept referenced: the library calls it
        self._lib.espeak_SetSynthCallback(self._callback)
        self._current: str | None = None

    def _declare(self) -> None:
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_Info.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_SetVoiceByProperties.restype = ctypes.c_int
        lib.espeak_GetCurrentVoice.argtypes = []
        lib.espeak_GetCurrentVoice.restype = ctypes.POINTER(_Voice)
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int

    def info(self) -> tuple[str, str]:
        """espeak-ng's version and the data folder it reads."""
        data = ctypes.c_char_p()
        version = self._lib.espeak_Info(ctypes.byref(data))
        return version.decode(), (data.value or b"").decode()

    def voices(self) -> list[VoiceInfo]:
        """Every language voice in the data (variants such as "+f3" are not listed)."""
        listed = self._lib.espeak_ListVoices(None)
        found: list[VoiceInfo] = []
        index = 0
        while listed[index]:
            found.append(_voice_info(listed[index].contents))
            index += 1
        return found

    def select(self, voice: str) -> VoiceInfo | None:
        """Make ``voice`` (a voice name or a language tag) the current voice; None if the data has none."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != _OK:
            language = ctypes.create_string_buffer(voice.encode())
            spec = _Voice(languages=ctypes.addressof(language))
            if self._lib.espeak_SetVoiceByProperties(ctypes.byref(spec)) != _OK:
                self._current = None
                return None
        self._current = voice
        return _voice_info(self._lib.espeak_GetCurrentVoice().contents)

    def speak(self, clause: str, voice: str, words_per_minute: int) -> np.ndarray:
        """One clause in ``voice``, as float32 mono at ``sample_rate``, with the pause that follows it."""
        if voice != self._current and self.select(voice) is None:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self._lib.espeak_SetParameter(_RATE, words_per_minute, 0)
        text = clause.encode("utf-8") + b"\0"
        self._samples = []
        status = self._lib.espeak_Synth(text, len(text), 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _END_PAUSE, None, None)
        if status != _OK:
            raise RuntimeError(f"espeak_Synth failed with status {status}")
        pcm = np.concatenate(self._samples) if self._samples else np.zeros(0, np.int16)
        return pcm.astype(np.float32) / 32768.0

    def _receive(self, wav: Any, count: int, _events: Any) -> int:
        if count > 0:
            self._samples.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0  # go on


def words_per_minute_for(base: int, speed: float) -> int:
    """``speed`` > 1 speaks faster; espeak-ng's own bounds apply."""
    return int(np.clip(round(base * speed), _MIN_WORDS_PER_MINUTE, _MAX_WORDS_PER_MINUTE))


def _listed_languages(voice: VoiceInfo, listed: dict[str, VoiceInfo]) -> list[tuple[str, int]]:
    """Every language the voice's entry in the data names: the current voice gives only its first."""
    entry = listed.get(voice.identifier.split("+")[0])
    return entry.languages if entry is not None else voice.languages


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    out = claim_stdout()
    espeak = Espeak(config["library"], config["data"])
    version, data = espeak.info()
    listed = {voice.identifier: voice for voice in espeak.voices()}
    selected = {name: espeak.select(name) for name in config["voices"]}
    ready = {
        "version": version,
        "data": data,
        "sample_rate": espeak.sample_rate,
        "languages": [voice.languages[0][0] for voice in listed.values() if voice.languages],
        "voices": {
            name: {"name": voice.name, "identifier": voice.identifier, "languages": _listed_languages(voice, listed)}
            for name, voice in selected.items()
            if voice is not None
        },
        "unknown_voices": [name for name, voice in selected.items() if voice is None],
    }
    base_rate = config["words_per_minute"]

    def speak(text: str, voice: str, speed: float) -> Iterator[Piece]:
        words_per_minute = words_per_minute_for(base_rate, speed)
        for sentence, clauses in split_clauses(text):
            for index, clause in enumerate(clauses):
                audio = espeak.speak(clause, voice, words_per_minute)
                yield Piece(sentence, index == 0, audio, espeak.sample_rate)

    serve_forever(out, ready, speak)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
