"""Facecast's engines: one interface per stage (``engines.base``), one folder per stage, one module per vendor."""

from pathlib import Path

# The checkout (or installed tree) that holds engines/, avatars/ and models/.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
