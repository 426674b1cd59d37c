"""``facecast avatars add``: real photos and videos in, a loadable avatar out; bad input leaves nothing behind."""

from __future__ import annotations

import argparse
import fractions
import io
import os
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from engines.avatar import AvatarError, load_avatar
from media_server.cli import avatars as avatars_cli
from media_server.config import load_settings

PORTRAIT = Path(__file__).resolve().parents[1] / "avatars" / "default" / "portrait.jpg"


def write_video(path: Path, shifts: list[int], fps: int = 25, blank: frozenset[int] = frozenset()) -> None:
    """The default portrait moved ``shifts[k]`` pixels to the right in frame k (plain gray in the frames
    listed in ``blank``), as H.264 in an MP4."""
    portrait = cv2.imread(str(PORTRAIT))
    height, width = portrait.shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = fractions.Fraction(1, fps)
        for k, shift in enumerate(shifts):
            moved = cv2.warpAffine(
                portrait, np.float32([[1, 0, shift], [0, 1, 0]]), (width, height), borderMode=cv2.BORDER_REPLICATE
            )
            if k in blank:
                moved = np.full_like(moved, 128)
            frame = av.VideoFrame.from_ndarray(moved, format="bgr24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "avatars"


def entries(root: Path) -> list[str]:
    """Everything in the avatars folder, hidden staging folders included."""
    return sorted(os.listdir(root)) if root.exists() else []


def test_a_photo_becomes_an_avatar_the_server_loads(root: Path) -> None:
    progress = io.StringIO()
    folder = avatars_cli.add_avatar(
        root,
        "astro",
        PORTRAIT,
        display_name="Astronaut Two",
        voice="joe",
        pads=[0.0, 0.25, 0.0, 0.0],
        progress_stream=progress,
    )
    assert folder == root / "astro" and entries(root) == ["astro"]
    avatar = load_avatar(folder)
    assert avatar.display_name == "Astronaut Two" and avatar.default_voice == "joe"
    assert len(avatar.frames) == 1 and avatar.size == (512, 512)
    assert (avatar.cache_dir / "faces.json").is_file()  # keyed by the content hash, where the server looks
    box = avatar.face_boxes[0]
    assert 150 < box.center[0] < 350 and 100 < box.center[1] < 300
    assert "pads = [0.0, 0.25, 0.0, 0.0]" in (folder / "avatar.toml").read_text()
    assert "finding the face (photo)" in progress.getvalue() and "1/1" in progress.getvalue()


def test_a_video_becomes_a_looping_avatar_with_smoothed_boxes(root: Path, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    write_video(clip, [0, 4, 8, 12, 16])
    progress = io.StringIO()
    avatar = load_avatar(avatars_cli.add_avatar(root, "clip", clip, progress_stream=progress))
    assert len(avatar.frames) == 5 and avatar.is_video
    centres = [box.center[0] for box in avatar.face_boxes]
    assert all(b >= a for a, b in zip(centres, centres[1:])) and 8 <= centres[-1] - centres[0] <= 20
    assert "5/5" in progress.getvalue()


def test_a_video_may_lose_the_face_in_a_few_frames_but_not_in_many(root: Path, tmp_path: Path) -> None:
    few, many = tmp_path / "few.mp4", tmp_path / "many.mp4"
    write_video(few, [0] * 12, blank=frozenset({5}))
    avatar = load_avatar(avatars_cli.add_avatar(root, "few", few, progress_stream=io.StringIO()))
    assert len(avatar.frames) == 12 and avatar.face_boxes[5] == avatar.face_boxes[4]
    write_video(many, [0] * 12, blank=frozenset({2, 5, 8}))
    with pytest.raises(AvatarError, match="no face found in 3 of 12 frames"):
        avatars_cli.add_avatar(root, "many", many, progress_stream=io.StringIO())
    assert entries(root) == ["few"]


def test_replace_swaps_the_avatar_in_one_step(root: Path, tmp_path: Path) -> None:
    avatars_cli.add_avatar(root, "astro", PORTRAIT, progress_stream=io.StringIO())
    with pytest.raises(AvatarError, match="already exists"):
        avatars_cli.add_avatar(root, "astro", PORTRAIT, progress_stream=io.StringIO())
    avatars_cli.add_avatar(root, "astro", PORTRAIT, display_name="New", replace=True, progress_stream=io.StringIO())
    assert entries(root) == ["astro"] and load_avatar(root / "astro").display_name == "New"


def gray_image(path: Path) -> Path:
    cv2.imwrite(str(path), np.full((480, 640, 3), 128, np.uint8))
    return path


def two_faces(path: Path) -> Path:
    portrait = cv2.imread(str(PORTRAIT))
    cv2.imwrite(str(path), np.concatenate([portrait, portrait], axis=1))
    return path


def random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).bytes(20_000))
    return path


def huge_file(path: Path) -> Path:
    with path.open("wb") as handle:  # sparse: costs no disk
        handle.truncate(201 * 2**20)
    return path


def huge_picture(path: Path) -> Path:
    cv2.imwrite(str(path), np.full((16, 9000, 3), 128, np.uint8))
    return path


def unsupported(path: Path) -> Path:
    path.write_bytes(PORTRAIT.read_bytes())
    return path


BAD_SOURCES = [
    ("gray.png", gray_image, "no face found"),
    ("pair.jpg", two_faces, "2 faces found"),
    ("corrupt.jpg", random_bytes, "corrupt"),
    ("corrupt.mp4", random_bytes, "corrupt"),
    ("huge.mp4", huge_file, "201 MB"),
    ("wide.png", huge_picture, "9000x16"),
    ("portrait.gif", unsupported, "unsupported file type '.gif'"),
    ("missing.jpg", None, "does not exist"),
]


@pytest.mark.parametrize(("name", "make", "message"), BAD_SOURCES, ids=[case[0] for case in BAD_SOURCES])
def test_bad_sources_are_refused_with_a_clear_error_and_nothing_left(
    root: Path, tmp_path: Path, name: str, make, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make(tmp_path / name) if make else tmp_path / name
    avatars_cli.add_avatar(root, "kept", PORTRAIT, progress_stream=io.StringIO())
    before = entries(root)
    settings = load_settings(None, {"server.avatars_dir": str(root)}, environ={})
    args = argparse.Namespace(
        name="new", source=source, display_name=None, voice=None, persona=None, pads=None, replace=False
    )
    with pytest.raises(SystemExit) as exit_info:
        avatars_cli.main(args, settings)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert entries(root) == before


def test_a_failure_while_replacing_keeps_the_old_avatar(root: Path, tmp_path: Path) -> None:
    avatars_cli.add_avatar(root, "astro", PORTRAIT, progress_stream=io.StringIO())
    with pytest.raises(AvatarError, match="no face"):
        avatars_cli.add_avatar(
            root, "astro", gray_image(tmp_path / "gray.png"), replace=True, progress_stream=io.StringIO()
        )
    assert entries(root) == ["astro"] and load_avatar(root / "astro").display_name == "astro"


@pytest.mark.parametrize("name", ["", "Has Space", "../escape", ".hidden", "x" * 65])
def test_avatar_names_are_checked(root: Path, name: str) -> None:
    with pytest.raises(AvatarError, match="avatar name"):
        avatars_cli.add_avatar(root, name, PORTRAIT, progress_stream=io.StringIO())
    assert entries(root) == []
