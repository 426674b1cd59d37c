"""config/default.toml and the settings models cannot disagree: every setting is in the file (set to the
model's default, or commented out when it has none), and the file sets nothing the models lack."""

from __future__ import annotations

import re
import tomllib

import pytest
from pydantic import BaseModel

from media_server.config import DEFAULT_CONFIG, Settings

SECTIONS = [name for name, info in Settings.model_fields.items() if info.default is not None and isinstance(info.default, BaseModel)]
TEXT = DEFAULT_CONFIG.read_text()
TREE = tomllib.loads(TEXT)


def commented_keys(section: str) -> set[str]:
    """Keys shown as ``# key = ...`` lines inside ``[section]`` (settings with no default value)."""
    body = re.search(rf"^\[{section}\][^\n]*\n(.*?)(?=^\[|\Z)", TEXT, re.S | re.M)
    assert body is not None, f"[{section}] is missing from {DEFAULT_CONFIG.name}"
    return set(re.findall(r"^# (\w+) = ", body.group(1), re.M))


def test_every_section_with_defaults_is_checked() -> None:
    assert {"server", "media", "broadcast", "turn_taking", "reply", "memory", "echo", "deadlines"} <= set(SECTIONS)


@pytest.mark.parametrize("section", SECTIONS)
def test_the_file_shows_every_setting_with_the_models_default(section: str) -> None:
    model: BaseModel = Settings.model_fields[section].default
    in_file = TREE.get(section, {})
    for key, info in type(model).model_fields.items():
        if key in in_file:
            assert getattr(type(model).model_validate({key: in_file[key]}), key) == getattr(model, key), (
                f"{section}.{key}: default.toml says {in_file[key]!r}, the model {getattr(model, key)!r}"
            )
        elif key not in ("avatars_dir", "static_dir", "outputs_dir"):  # where the checkout is: not a user's setting
            assert getattr(model, key) is None and key in commented_keys(section), (
                f"{section}.{key} is missing from default.toml"
            )
