"""Documents into the knowledge bases over HTTP: the talk page's upload, and OPEA-compatible data prep.

- ``POST /api/knowledge/{base}/documents``: multipart ``files``; the talk page's drag and drop.
- ``POST /v1/dataprep/ingest``, ``/v1/dataprep/get``, ``/v1/dataprep/delete``: the fields of OPEA
  GenAIComps' dataprep microservice, so its clients work unchanged. ``index_name`` is the knowledge base
  (``default`` when unset); ``link_list`` is refused: the server fetches nothing from the web.
  ``chunk_size``, ``chunk_overlap``, ``process_table`` and ``table_strategy`` are accepted and not used:
  passages are cut by ``knowledge.chunk_words`` for every document of a base. A document of a name the
  base holds already replaces it (OPEA refuses it).

Files are received as they stream (each refused as soon as its type or size rules it out, before the
rest is read), then indexed in a thread, all or none: a bad file leaves the base as it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import PurePath
from typing import ParamSpec, TypeVar

from aiohttp import BodyPartReader, web

from engines.knowledge import (
    DEFAULT_BASE,
    DocumentBytes,
    DocumentError,
    DocumentInfo,
    DocumentTooLargeError,
    IngestReport,
    KnowledgeError,
    ModelMismatchError,
    UnsupportedDocumentError,
    check_document,
    check_name,
)
from media_server.http.errors import ApiError, bad_request, json_body
from media_server.http.state import RUNTIME

MAX_FILES = 20  # per request
FORM_FIELD_BYTES = 64 * 1024  # link_list, index_name and the other small fields
ALL_FILES = "all"  # OPEA's file_path that deletes every document
P = ParamSpec("P")
T = TypeVar("T")


async def upload(request: web.Request) -> web.Response:
    """Add the request's ``files`` to the base in the path; the report of what was indexed."""
    base = _base_name(request.match_info["base"])
    documents, _ = await _multipart_documents(request)
    report = await _ingest(request, base, documents)
    return web.json_response(
        {
            "base": base,
            "added": [_document_json(info) for info in report.added],
            "replaced": list(report.replaced),
            "warnings": list(report.warnings),
            "seconds": round(report.seconds, 2),
        }
    )


async def dataprep_ingest(request: web.Request) -> web.Response:
    documents, fields = await _multipart_documents(request, allow_none=True)
    if fields.get("link_list", "").strip() not in ("", "[]"):
        raise bad_request(
            "link_list: this server does not fetch web pages (it makes no outbound requests); "
            "save the pages and send them as files",
            "links_not_fetched",
        )
    if not documents:
        raise bad_request("send the documents as multipart form field 'files'", "no_files")
    await _ingest(request, _base_name(fields.get("index_name") or DEFAULT_BASE), documents)
    return web.json_response({"status": 200, "message": "Data preparation succeeded"})


async def dataprep_get(request: web.Request) -> web.Response:
    """The base's documents as OPEA's file structures (a base that does not exist yet holds none)."""
    base = _index_name(await json_body(request, optional=True))
    knowledge = request.app[RUNTIME].knowledge
    if base not in knowledge.names():
        return web.json_response([])
    documents = await _in_thread(knowledge.documents, base)
    return web.json_response([{"name": d.name, "id": d.name, "type": "File", "parent": ""} for d in documents])


async def dataprep_delete(request: web.Request) -> web.Response:
    """Remove one document (``file_path``: its name) or every one ("all") from the base."""
    body = await json_body(request)
    name = body.get("file_path")
    if not isinstance(name, str) or not name:
        raise bad_request('"file_path" must be the name of a document (as /v1/dataprep/get lists it), or "all"')
    base = _index_name(body)
    knowledge = request.app[RUNTIME].knowledge
    if base not in knowledge.names():
        raise ApiError(404, "not_found", f"there is no knowledge base {base!r}")
    held = [info.name for info in await _in_thread(knowledge.documents, base)]
    removed = held if name == ALL_FILES else [PurePath(name).name]
    if not set(removed) <= set(held):
        raise ApiError(404, "not_found", f"knowledge base {base!r} has no document {name!r}; it holds: {', '.join(held)}")
    for document in removed:
        await _in_thread(knowledge.remove, base, document)
    return web.json_response({"status": True})


def _index_name(body: dict[str, object]) -> str:
    base = body.get("index_name") or DEFAULT_BASE
    if not isinstance(base, str):
        raise bad_request('"index_name" must be the name of a knowledge base')
    return _base_name(base)


def _base_name(name: str) -> str:
    try:
        return check_name(name)
    except KnowledgeError as error:
        raise bad_request(str(error), "bad_base_name") from None


async def _multipart_documents(
    request: web.Request, allow_none: bool = False
) -> tuple[list[DocumentBytes], dict[str, str]]:
    """The documents in the form's ``files`` fields, and its other fields as text."""
    if not request.content_type.startswith("multipart/"):
        raise ApiError(415, "unsupported_media_type", "send the documents as multipart/form-data, field 'files'")
    max_bytes = int(request.app[RUNTIME].settings.knowledge.max_file_mb * 2**20)
    documents: list[DocumentBytes] = []
    fields: dict[str, str] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise bad_request("nested multipart bodies are not supported")
        if part.name == "files" and part.filename is not None:
            if len(documents) == MAX_FILES:
                raise ApiError(413, "too_many_files", f"at most {MAX_FILES} files a request; send the rest in another")
            documents.append(await _received_file(part, PurePath(part.filename).name, max_bytes))
        elif part.name is not None:
            fields[part.name] = (await part.read(decode=True))[:FORM_FIELD_BYTES].decode("utf-8", errors="replace")
    if not documents and not allow_none:
        raise bad_request("send the documents as multipart form field 'files'", "no_files")
    return documents, fields


async def _received_file(part: BodyPartReader, name: str, max_bytes: int) -> DocumentBytes:
    """One file of the form, refused by its name before it is read and as soon as it passes ``max_bytes``."""
    try:
        check_document(name, 0, max_bytes)
        data = bytearray()
        while chunk := await part.read_chunk():
            data += chunk
            check_document(name, len(data), max_bytes, received_so_far=True)
    except DocumentError as error:
        raise _document_refusal(error) from None
    return DocumentBytes(name, bytes(data))


async def _ingest(request: web.Request, base: str, documents: list[DocumentBytes]) -> IngestReport:
    knowledge = request.app[RUNTIME].knowledge
    try:
        return await _in_thread(knowledge.add, base, documents)
    except DocumentError as error:
        raise _document_refusal(error) from None


async def _in_thread(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``function(*args)`` in a thread (it may load the embedding model). A base built with another model is
    409; a model that cannot be loaded 503; a DocumentError is the caller's to answer."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except ModelMismatchError as error:
        raise ApiError(409, "model_mismatch", str(error)) from None
    except DocumentError:
        raise
    except KnowledgeError as error:
        raise ApiError(503, "knowledge_unavailable", str(error)) from None


def _document_refusal(error: DocumentError) -> ApiError:
    if isinstance(error, DocumentTooLargeError):
        return ApiError(413, "document_too_large", str(error))
    if isinstance(error, UnsupportedDocumentError):
        return ApiError(415, "unsupported_document", str(error))
    return bad_request(str(error), "bad_document")


def _document_json(info: DocumentInfo) -> dict[str, object]:
    return {"name": info.name, "kind": info.kind, "pages": info.pages, "passages": info.passages}
