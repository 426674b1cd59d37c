"""An engine whose loading crashes inside native code, as a broken llama.cpp build would (SIGSEGV)."""

from __future__ import annotations

import ctypes

from pydantic import ConfigDict

from engines.base import EngineSettings


class SegfaultingEngine:
    class Settings(EngineSettings):
        model_config = ConfigDict(extra="ignore")  # takes the place of any configured engine

    def __init__(self, settings: Settings) -> None:
        ctypes.string_at(0)  # reads address 0: a real segmentation fault, not a Python exception
