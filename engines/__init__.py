"""Facecast's engines: one interface per stage (``engines.base``), one module per implementation."""
