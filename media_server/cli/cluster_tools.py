"""What the command-line tools do with a cluster (``--cluster URL`` or ``[cluster] url``): share an added
avatar, render as a durable job, and check the connection for ``facecast doctor``. Imported only then."""

from __future__ import annotations

import os
from pathlib import Path

from engines.avatar import AvatarCatalogue
from media_server.cli.render import RenderError
from media_server.cluster import jobs
from media_server.cluster.avatars import publish_avatar, shared_hash
from media_server.cluster.link import ClusterLink, redacted
from media_server.cluster.registry import ClusterView
from media_server.cluster.shared import ClusterUnavailable
from media_server.config import Settings

CONNECT_WAIT_S = 10.0


async def _connected(settings: Settings, role: str) -> ClusterLink:
    link = ClusterLink(settings.cluster, role=role)
    await link.start()
    if not await link.wait_connected(CONNECT_WAIT_S):
        await link.close()
        raise ClusterUnavailable(f"cannot reach NATS at {redacted(link.url)} within {CONNECT_WAIT_S:g} s")
    return link


async def share_avatar(settings: Settings, folder: Path) -> None:
    """Publish the avatar in ``folder`` to the cluster's object store."""
    link = await _connected(settings, "tool")
    try:
        avatar = AvatarCatalogue(folder.parent).get(folder.name)
        await publish_avatar(link, folder, avatar.source_hash)
    finally:
        await link.close()


async def render_in_cluster(settings: Settings, avatar: str, audio_path: Path, out_path: Path, timeout_s: float = 600.0) -> str:
    """Render as a job on the cluster's workers and write its MP4 to ``out_path``; what happened, in words."""
    if not audio_path.is_file():
        raise RenderError(f"{audio_path} does not exist or is not a file")
    link = await _connected(settings, "tool")
    try:
        catalogue = AvatarCatalogue(settings.server.avatars_dir)
        if avatar in catalogue.names() and await shared_hash(link, avatar) is None:
            await publish_avatar(link, catalogue.root / avatar, catalogue.get(avatar).source_hash)
        job_id = await jobs.submit_render(link, audio_path.read_bytes(), avatar)
        status = await jobs.wait_for_job(link, job_id, timeout_s)
        if status.state == "failed":
            raise RenderError(f"job {job_id} failed after {status.attempts} attempts: {status.error}")
        video = await jobs.job_video(link, job_id)
        if video is None:
            raise RenderError(f"job {job_id} is done but its video has expired from the cluster")
    finally:
        await link.close()
    temporary = out_path.with_name(f".{out_path.stem}.{os.getpid()}.partial.mp4")
    temporary.write_bytes(video)
    os.replace(temporary, out_path)
    return (
        f"wrote {out_path}: {status.frames} frames, {status.audio_seconds:.2f} s of audio, rendered by worker "
        f"{status.worker} (job {job_id}, attempt {status.attempts})"
    )


async def check_connection(settings: Settings) -> dict[str, object]:
    """For ``facecast doctor``: whether NATS answers, with JetStream, and who is in the cluster."""
    link = ClusterLink(settings.cluster, role="doctor")
    view = ClusterView(link)
    await link.start()
    try:
        if not await link.wait_connected(CONNECT_WAIT_S / 2):
            return {"url": redacted(link.url), "connected": False, "error": "NATS did not answer"}
        account = await link.jetstream().account_info()
        heard = await view.settle(link.settings.heartbeat_s * 3)
        return {
            "url": redacted(link.url),
            "connected": True,
            "jetstream": {"streams": account.streams, "memory_bytes": account.memory, "storage_bytes": account.storage},
            "nodes": sorted(entry.id for entry in heard if entry.role == "node"),
            "workers": sorted(entry.id for entry in heard if entry.role == "worker"),
        }
    except Exception as error:  # noqa: BLE001 - the report says what is wrong instead of a traceback
        return {"url": redacted(link.url), "connected": link.connected, "error": str(error)}
    finally:
        await link.close()
