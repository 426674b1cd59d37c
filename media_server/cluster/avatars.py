"""Avatars shared through a JetStream object store: ``facecast avatars add`` publishes the avatar's folder
(its source, ``avatar.toml`` and the prepared face data under ``.cache/``); a node or worker asked for an
avatar it lacks fetches it once and keeps it in its own avatars folder."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from nats.js.api import ObjectMeta
from nats.js.errors import NotFoundError, ObjectNotFoundError

from engines.avatar import Avatar, AvatarCatalogue
from media_server.cluster.link import ClusterLink

log = logging.getLogger(__name__)
STORE = "avatars"


def pack(folder: Path) -> bytes:
    """The avatar's folder as a gzipped tar, its files under the avatar's name."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname=folder.name)
    return buffer.getvalue()


def unpack(data: bytes, root: Path, name: str) -> Path:
    """Extract a packed avatar into ``root/name`` (replacing it) with one rename, never half-written."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".fetching-{name}-", dir=root))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            archive.extractall(staging, filter="data")  # refuses absolute paths, links out, devices
        unpacked = staging / name
        if not unpacked.is_dir():
            raise ValueError(f"the shared avatar {name!r} does not hold a folder of that name")
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(unpacked, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


async def publish_avatar(link: ClusterLink, folder: Path, source_hash: str) -> None:
    """Share the avatar in ``folder``; the object's description is its source's hash."""
    store = await link.object_store(STORE)
    await store.put(folder.name, pack(folder), meta=ObjectMeta(name=folder.name, description=source_hash))


async def shared_hash(link: ClusterLink, name: str) -> str | None:
    """The source hash of the shared avatar ``name``, or None when none is shared under that name."""
    store = await link.object_store(STORE)
    try:
        info = await store.get_info(name)
    except (ObjectNotFoundError, NotFoundError):
        return None
    return info.description


async def fetch_avatar(link: ClusterLink, root: Path, name: str) -> Path | None:
    """Fetch the shared avatar ``name`` into ``root``; None when the cluster has none of that name."""
    store = await link.object_store(STORE)
    try:
        result = await store.get(name)
    except (ObjectNotFoundError, NotFoundError):
        return None
    log.info("cluster: fetched avatar %r from the object store", name)
    return unpack(result.data or b"", root, name)


class SharedAvatars:
    """This process's avatars folder, completed from the object store on first use of an avatar it lacks."""

    def __init__(self, link: ClusterLink, catalogue: AvatarCatalogue) -> None:
        self.link = link
        self.catalogue = catalogue
        self._fetching: dict[str, asyncio.Task[Path | None]] = {}

    async def ensure(self, name: str) -> bool:
        """Whether ``name`` is in the avatars folder now, fetching it from the cluster if it was not."""
        if name in self.catalogue.names():
            return True
        if not self.link.connected:
            return False
        task = self._fetching.get(name)
        if task is None:  # sessions asking for it together fetch it once
            task = self._fetching[name] = asyncio.create_task(fetch_avatar(self.link, self.catalogue.root, name))
            task.add_done_callback(lambda _: self._fetching.pop(name, None))
        try:
            return await asyncio.shield(task) is not None
        except Exception as error:  # noqa: BLE001 - the broker's bad moment: the avatar is unknown for now
            log.warning("cluster: could not fetch avatar %r: %s", name, error)
            return False

    async def get(self, name: str) -> Avatar:
        """The avatar, fetched if need be; KeyError when neither this process nor the cluster has it."""
        if not await self.ensure(name):
            raise KeyError(name)
        return await asyncio.to_thread(self.catalogue.get, name)
