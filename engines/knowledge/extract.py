"""Text out of documents, offline: PDF (pypdf, BSD), Markdown, plain text and HTML (the standard library's parser).

A document becomes blocks of text, each with where it came from: its page (PDF) or the path of
headings it sits under (Markdown, HTML). Within a block, paragraphs are separated by blank lines and
single line breaks are soft (a PDF's wrapped lines). Anything that cannot be indexed raises a
DocumentError naming the file and what to do about it.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from pypdf import PdfReader
from pypdf.errors import PyPdfError

from engines.embedded_models import sha256_of
from engines.knowledge.errors import DocumentError, DocumentTooLargeError, UnsupportedDocumentError

KINDS = {
    ".pdf": "pdf",
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".html": "html",
    ".htm": "html",
}
SUPPORTED = "PDF (.pdf), Markdown (.md, .markdown), plain text (.txt, .text), HTML (.html, .htm)"
SECTION_SEPARATOR = " > "


@dataclass(frozen=True)
class Block:
    text: str
    page: int | None = None  # 1-based, PDF only
    section: str | None = None  # the headings above the text, outermost first


@dataclass(frozen=True)
class DocumentBytes:
    """A document given as its name and contents (an upload) rather than a file on disk."""

    name: str
    data: bytes


@dataclass(frozen=True)
class ExtractedDocument:
    name: str
    kind: str
    blocks: tuple[Block, ...]
    pages: int | None
    sha256: str
    size_bytes: int
    warnings: tuple[str, ...] = ()


def read_source(source: Path | DocumentBytes, max_bytes: int) -> DocumentBytes:
    """The document's name and bytes, refusing an unsupported type or an oversized file before reading it."""
    if isinstance(source, DocumentBytes):
        check_document(source.name, len(source.data), max_bytes)
        return source
    path = Path(source)
    _kind_of(path.name)
    if not path.is_file():
        raise DocumentError(f"{path} does not exist or is not a file")
    check_document(path.name, path.stat().st_size, max_bytes)
    return DocumentBytes(path.name, path.read_bytes())


def extract(document: DocumentBytes) -> ExtractedDocument:
    """The document's text as blocks; DocumentError if it is encrypted, scanned, empty or unreadable."""
    kind = _kind_of(document.name)
    warnings: tuple[str, ...] = ()
    pages = None
    if kind == "pdf":
        blocks, pages, warnings = _pdf_blocks(document.name, document.data)
    elif kind == "markdown":
        blocks = _markdown_blocks(_decode(document.name, document.data))
    elif kind == "html":
        blocks = _html_blocks(_decode(document.name, document.data))
    else:
        blocks = [Block(_decode(document.name, document.data))]
    blocks = [block for block in blocks if block.text.strip()]
    if not blocks:
        raise DocumentError(f"{document.name} is empty: it holds no text to index")
    return ExtractedDocument(
        document.name, kind, tuple(blocks), pages, sha256_of(document.data), len(document.data), warnings
    )


def check_document(name: str, size: int, max_bytes: int, *, received_so_far: bool = False) -> None:
    """Refuse a document by its name and size alone, before it is read or, with ``received_so_far``, while it
    is received (``size`` is then what has arrived): UnsupportedDocumentError for a type that cannot be
    indexed, DocumentTooLargeError over ``max_bytes``."""
    _kind_of(name)
    _check_size(name, size, max_bytes, received_so_far)


def _kind_of(name: str) -> str:
    suffix = Path(name).suffix.lower()
    kind = KINDS.get(suffix)
    if kind is None:
        raise UnsupportedDocumentError(f"{name}: unsupported file type {suffix or '(none)'!r}; supported: {SUPPORTED}")
    return kind


def _check_size(name: str, size: int, max_bytes: int, received_so_far: bool = False) -> None:
    if size <= max_bytes:
        return
    limit = f"{max_bytes / 2**20:g} MB"
    size_and_limit = (
        f"is over {limit}, the limit" if received_so_far else f"is {size / 2**20:.1f} MB; the limit is {limit}"
    )
    raise DocumentTooLargeError(
        f"{name} {size_and_limit} (knowledge.max_file_mb): split the document or raise the limit"
    )


def _decode(name: str, data: bytes) -> str:
    if b"\x00" in data[:4096]:
        raise DocumentError(f"{name} is not a text file (it holds binary data); convert it to text, Markdown or PDF")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")  # the usual encoding of older Windows text files


# --- PDF -------------------------------------------------------------------


def _pdf_blocks(name: str, data: bytes) -> tuple[list[Block], int, tuple[str, ...]]:
    # pypdf logs every oddity of a malformed file; an unreadable one raises, which is what the user sees.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):  # an empty user password only restricts printing etc.
            raise DocumentError(
                f"{name} is encrypted: remove the password first (e.g. qpdf --decrypt), then add it again"
            )
        texts = [_clean_pdf_text(page.extract_text() or "") for page in reader.pages]
    except PyPdfError as error:
        raise DocumentError(f"{name} is not a readable PDF ({error}); check the file or export it again") from error
    if not texts:
        raise DocumentError(f"{name} is empty: the PDF has no pages")
    blank = [number for number, text in enumerate(texts, start=1) if not text.strip()]
    if len(blank) == len(texts):
        raise DocumentError(
            f"{name} has no text layer (scanned pages or images only); run OCR first (e.g. ocrmypdf), then add the result"
        )
    warnings = (f"{name}: pages {_page_list(blank)} have no text layer and were skipped",) if blank else ()
    return [Block(text, page=number) for number, text in enumerate(texts, start=1)], len(texts), warnings


def _clean_pdf_text(text: str) -> str:
    text = re.sub(r"(\w)-\n(\w)", r"\1\2", text)  # a word hyphenated across a line break
    return "\n".join(line.strip() for line in text.splitlines())


def _page_list(pages: list[int]) -> str:
    shown = ", ".join(map(str, pages[:10]))
    return shown + (f" and {len(pages) - 10} more" if len(pages) > 10 else "")


# --- Markdown --------------------------------------------------------------

ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(\s+#+)?\s*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
INLINE_MARKUP = (
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # image: its alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # link: its text
    (re.compile(r"\[([^\]]+)\]\[[^\]]*\]"), r"\1"),  # reference link
    (re.compile(r"</?[A-Za-z][^>]*>"), ""),  # inline HTML tags
    (re.compile(r"(\*\*|__|~~|`)"), ""),
    (re.compile(r"(?<![\w*])[*_](?=\S)(.+?)(?<=\S)[*_](?![\w*])"), r"\1"),  # *emphasis*
)


class _Sections:
    """Blocks under a stack of headings: each heading closes the text gathered under the previous one."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.headings: list[tuple[int, str]] = []
        self.paragraphs: list[str] = []

    def heading(self, level: int, title: str) -> None:
        self.flush()
        self.headings = [(lvl, text) for lvl, text in self.headings if lvl < level]
        if title:
            self.headings.append((level, title))

    def paragraph(self, text: str) -> None:
        text = " ".join(text.split())
        if text:
            self.paragraphs.append(text)

    def flush(self) -> None:
        if self.paragraphs:
            section = SECTION_SEPARATOR.join(title for _, title in self.headings) or None
            self.blocks.append(Block("\n\n".join(self.paragraphs), section=section))
        self.paragraphs = []


def _strip_inline(text: str) -> str:
    for pattern, replacement in INLINE_MARKUP:
        text = pattern.sub(replacement, text)
    return text


def _skip_front_matter(lines: list[str]) -> list[str]:
    if lines and lines[0].strip() == "---":
        for index, line in enumerate(lines[1:], start=1):
            if line.strip() in ("---", "..."):
                return lines[index + 1 :]
    return lines


def _markdown_blocks(text: str) -> list[Block]:
    sections = _Sections()
    paragraph: list[str] = []
    in_fence = False

    def end_paragraph() -> None:
        sections.paragraph(" ".join(paragraph))
        paragraph.clear()

    for line in _skip_front_matter(text.splitlines()):
        if FENCE.match(line):
            end_paragraph()
            in_fence = not in_fence
            continue
        if in_fence:
            sections.paragraph(line)
            continue
        heading = ATX_HEADING.match(line)
        if heading:
            end_paragraph()
            sections.heading(len(heading.group(1)), _strip_inline(heading.group(2)).strip())
        elif SETEXT_UNDERLINE.match(line) and len(paragraph) == 1:
            title = paragraph.pop()
            sections.heading(1 if line.strip().startswith("=") else 2, _strip_inline(title).strip())
        elif not line.strip() or TABLE_RULE.match(line) or SETEXT_UNDERLINE.match(line):
            end_paragraph()
        elif LIST_ITEM.match(line) or line.lstrip().startswith("|"):
            end_paragraph()  # each list item and table row reads as its own sentence
            paragraph.append(_strip_inline(LIST_ITEM.sub("", line).replace("|", " ")))
            end_paragraph()
        else:
            paragraph.append(_strip_inline(re.sub(r"^\s*>\s?", "", line)))
    end_paragraph()
    sections.flush()
    return sections.blocks


# --- HTML ------------------------------------------------------------------

SKIPPED_ELEMENTS = {"script", "style", "nav", "noscript", "template", "svg", "head"}
HEADINGS = {f"h{level}": level for level in range(1, 7)}
BLOCK_ELEMENTS = {
    "p", "div", "li", "br", "tr", "table", "ul", "ol", "dl", "dt", "dd", "section", "article", "main", "header",
    "footer", "aside", "blockquote", "pre", "figure", "figcaption", "hr", "form", "fieldset", "address",
}  # fmt: skip


class _HtmlText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections = _Sections()
        self.skipping = 0
        self.heading_level: int | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in SKIPPED_ELEMENTS:
            self.skipping += 1
        elif self.skipping:
            return
        elif tag in HEADINGS:
            self._end_paragraph()
            self.heading_level = HEADINGS[tag]
        elif tag in BLOCK_ELEMENTS:
            self._end_paragraph()
        elif tag in ("td", "th"):
            self.text.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in SKIPPED_ELEMENTS:
            self.skipping = max(0, self.skipping - 1)
        elif self.skipping:
            return
        elif tag in HEADINGS and self.heading_level is not None:
            self.sections.heading(self.heading_level, " ".join("".join(self.text).split()))
            self.text.clear()
            self.heading_level = None
        elif tag in BLOCK_ELEMENTS:
            self._end_paragraph()

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.text.append(data)

    def _end_paragraph(self) -> None:
        if self.heading_level is None:
            self.sections.paragraph("".join(self.text))
            self.text.clear()

    def blocks(self) -> list[Block]:
        self._end_paragraph()
        self.sections.flush()
        return self.sections.blocks


def _html_blocks(text: str) -> list[Block]:
    parser = _HtmlText()
    parser.feed(text)
    parser.close()
    return parser.blocks()
