"""Documents for knowledge-base tests and benchmarks, made on the spot: a tiny PDF writer and a synthetic handbook.

The handbook is a fictional company's: offices, products, meeting rooms, projects and allowances, each
fact stated once, in one of several phrasings, among general policy sentences. Every fact comes with
a question and the words its answer must contain, so a benchmark knows which passage answers which
question. Most facts hang on a made-up name that the question repeats (what full-text search is good
at); the POLICIES are everyday rules asked about in other words than they are written in (what
sentence embeddings are good at).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PAGE_WIDTH, PAGE_HEIGHT = 612, 792  # US Letter, in points
MARGIN = 50
FONT_SIZE = 10
LEADING = 13
CHARACTERS_PER_LINE = 95  # Helvetica at 10 pt across the page between the margins


def _wrap(paragraph: str, width: int = CHARACTERS_PER_LINE) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in paragraph.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])


def _pdf_string(text: str) -> bytes:
    encoded = text.encode("cp1252", errors="replace")
    return b"(" + encoded.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def _text_stream(paragraphs: Sequence[str]) -> bytes:
    top = PAGE_HEIGHT - MARGIN
    commands = [b"BT", f"/F1 {FONT_SIZE} Tf {LEADING} TL {MARGIN} {top} Td".encode()]
    for paragraph in paragraphs:
        for line in _wrap(paragraph):
            commands.append(_pdf_string(line) + b" Tj T*")
        commands.append(b"T*")
    commands.append(b"ET")
    return b"\n".join(commands)


# A grey rectangle where a scanned page would have its picture: a page with no text layer.
IMAGE_ONLY_STREAM = f"0.6 g {MARGIN} {MARGIN} {PAGE_WIDTH - 2 * MARGIN} {PAGE_HEIGHT - 2 * MARGIN} re f".encode()


def pdf_bytes(pages: Sequence[Sequence[str] | None]) -> bytes:
    """A PDF with one page per entry: its paragraphs in Helvetica, or (None) a page with no text at all."""
    streams = [IMAGE_ONLY_STREAM if page is None else _text_stream(page) for page in pages]
    page_ids = [4 + 2 * index for index in range(len(pages))]
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{' '.join(f'{i} 0 R' for i in page_ids)}] /Count {len(pages)} >>".encode(),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    for page_id, stream in zip(page_ids, streams):
        objects[page_id] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_WIDTH} {PAGE_HEIGHT}] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {page_id + 1} 0 R >>"
        ).encode()
        objects[page_id + 1] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offsets[number] for number in sorted(objects))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def write_pdf(path: Path, pages: Sequence[Sequence[str] | None]) -> Path:
    path.write_bytes(pdf_bytes(pages))
    return path


# --- the synthetic handbook --------------------------------------------------


@dataclass(frozen=True)
class Fact:
    statement: str
    question: str
    answer: str  # words a passage must contain to answer the question


@dataclass(frozen=True)
class PlacedFact:
    fact: Fact
    document: str
    page: int | None  # PDF page
    section: str | None  # Markdown section heading


SYLLABLES = (
    "ka", "lo", "mi", "ra", "ven", "tor", "sil", "qua", "dre", "nox", "pel", "zu", "bri", "fen", "gal", "hem", "jor",
    "lis", "mar", "nev", "or", "pin", "rus", "tal", "ul", "vik", "wes", "yar",
)  # fmt: skip
ITEMS = (
    "training courses", "home office equipment", "gym membership", "public transport", "professional books",
    "language lessons", "conference travel", "mobile phone costs",
)  # fmt: skip
FIRST_NAMES = (
    "Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Ines", "Jonas", "Karin", "Leo", "Maria",
    "Nils", "Olga", "Paul", "Rosa", "Sven", "Tara", "Umar",
)  # fmt: skip
FILLER_SUBJECTS = (
    "Team leads", "New colleagues", "The facilities team", "Every department", "Managers", "The works council",
    "Our auditors", "The IT helpdesk", "Project owners", "The safety officer",
)  # fmt: skip
FILLER_VERBS = ("review", "update", "discuss", "document", "check", "approve", "share", "plan")
FILLER_OBJECTS = (
    "the quarterly goals", "the onboarding checklist", "the travel guidelines", "the security rules",
    "the shared calendars", "the supplier contracts", "the expense reports", "the fire drill schedule",
    "the visitor policy", "the office layout", "the recycling plan", "the meeting etiquette",
)  # fmt: skip
FILLER_REASONS = (
    "so that everyone knows what is expected", "to keep the workplace safe", "before the end of each month",
    "together with the people affected", "in the monthly all-hands meeting", "as described in the intranet",
    "whenever the rules change", "with help from the office managers",
)  # fmt: skip


POLICIES = (
    Fact(
        "Bicycles may be stored in the locked shed behind the east wing.", "Where can I leave my bike?", "locked shed"
    ),
    Fact(
        "Lost badges must be reported to reception, which issues a temporary pass for 15 euros.",
        "What happens if I misplace my ID card?",
        "temporary pass",
    ),
    Fact(
        "Dogs are welcome in the office on Fridays as long as they are on a leash.",
        "Can I bring my pet to work?",
        "Fridays",
    ),
    Fact(
        "The canteen serves a vegan dish every day between noon and two.",
        "Is there plant-based food at lunch?",
        "vegan dish",
    ),
    Fact(
        "New parents receive twenty weeks of paid leave after the birth or adoption of a child.",
        "How long is maternity or paternity leave?",
        "twenty weeks",
    ),
    Fact(
        "Overtime is compensated with time off in lieu, not with extra pay.",
        "Do I get more money for working longer hours?",
        "time off in lieu",
    ),
    Fact(
        "Smoking is only allowed in the marked area next to the car park.",
        "Where may I have a cigarette?",
        "marked area",
    ),
    Fact(
        "Laptops must be locked with a cable whenever they are left unattended at a desk.",
        "How should I secure my computer when I step away?",
        "locked with a cable",
    ),
    Fact(
        "The first aid kits hang beside the lifts on every floor.",
        "Where are the bandages if someone gets hurt?",
        "beside the lifts",
    ),
    Fact("Salaries are paid on the twenty-fifth of each month.", "When do we get our wages?", "twenty-fifth"),
    Fact(
        "Employees can work remotely up to three days a week after their probation period.",
        "How often am I allowed to work from home?",
        "three days a week",
    ),
    Fact(
        "Sick notes from a doctor are needed from the third day of illness.",
        "When do I need a medical certificate if I am unwell?",
        "third day",
    ),
    Fact(
        "Visitors sign in at the front desk and wear a yellow lanyard.",
        "What must guests do when they arrive?",
        "yellow lanyard",
    ),
    Fact("Printing in colour needs approval from your line manager.", "Can I make coloured copies?", "line manager"),
    Fact(
        "The fire assembly point is the lawn across the street from the main entrance.",
        "Where should we gather during an evacuation?",
        "lawn across the street",
    ),
    Fact("Annual performance talks take place every November.", "When is the yearly review with my boss?", "November"),
    Fact(
        "Company cars may be used privately if the fuel is paid for personally.",
        "Can I drive the firm's vehicle at the weekend?",
        "fuel is paid for personally",
    ),
    Fact(
        "Notice periods are three months for both sides after the first year.",
        "How early must I tell the company that I am quitting?",
        "three months",
    ),
    Fact("Coffee and tea in the kitchens are free of charge.", "Do hot drinks cost anything?", "free of charge"),
    Fact(
        "Passwords expire every ninety days and must have at least twelve characters.",
        "How long does my login secret stay valid?",
        "ninety days",
    ),
    Fact(
        "Christmas Eve and New Year's Eve are half working days.",
        "Do we work on the 24th of December?",
        "half working days",
    ),
    Fact(
        "Travel by train is preferred over flights for trips under five hundred kilometres.",
        "Should I fly or take the rail for short business journeys?",
        "preferred over flights",
    ),
    Fact(
        "The gym in the basement is open to staff from six in the morning until ten at night.",
        "When can I exercise in the fitness room downstairs?",
        "six in the morning",
    ),
    Fact(
        "Lockers on the ground floor can be rented for five euros a month.",
        "Is there somewhere to keep my belongings?",
        "Lockers",
    ),
    Fact(
        "Employees celebrating ten years with the company receive an extra week of holiday.",
        "What is the reward for a decade of service?",
        "extra week of holiday",
    ),
    Fact(
        "Confidential paper must go into the grey shredding bins, never the normal waste.",
        "How do I dispose of sensitive documents?",
        "grey shredding bins",
    ),
    Fact(
        "Mothers can use the quiet room on the second floor for breastfeeding.",
        "Is there a place for nursing a baby?",
        "quiet room",
    ),
    Fact(
        "Gifts from suppliers worth more than fifty euros must be declined.",
        "Am I allowed to accept presents from vendors?",
        "fifty euros",
    ),
    Fact(
        "The helpdesk replaces broken keyboards and mice within one working day.",
        "How fast will IT swap a faulty mouse?",
        "one working day",
    ),
    Fact(
        "Employees may take two paid days each year for volunteering at a charity.",
        "Is there paid leave for doing unpaid community work?",
        "two paid days",
    ),
)


class Handbook:
    """A deterministic fictional handbook: ``pages()`` of paragraphs, each page stating a few facts."""

    def __init__(self, seed: int = 7) -> None:
        self.random = random.Random(seed)
        self._used_names: set[str] = set()

    def _name(self) -> str:
        while True:
            name = "".join(self.random.choice(SYLLABLES) for _ in range(self.random.choice((2, 3)))).capitalize()
            if name not in self._used_names and len(name) > 3:
                self._used_names.add(name)
                return name

    def fact(self) -> Fact:
        r = self.random
        kind = r.randrange(6)
        name = self._name()
        if kind == 0:
            opens, closes = r.randint(6, 10), r.randint(16, 20)
            statement = r.choice(
                (
                    f"The {name} office opens at {opens}:00 and closes at {closes}:00 on weekdays.",
                    f"Our branch in {name} welcomes visitors from {opens}:00 until {closes}:00, Monday to Friday.",
                )
            )
            return Fact(statement, f"What time does the office in {name} open in the morning?", f"{opens}:00")
        if kind == 1:
            weight = f"{r.randint(2, 60)}.{r.randint(1, 9)}"
            statement = r.choice(
                (
                    f"The {name} desk lamp weighs {weight} kilograms without its stand.",
                    f"Shipping the {name} printer is easy: it weighs only {weight} kilograms.",
                )
            )
            return Fact(statement, f"How heavy is the {name}?", f"{weight} kilograms")
        if kind == 2:
            years = r.randint(2, 9)
            statement = f"Every {name} laptop we sell comes with a {years}-year warranty on parts and repairs."
            return Fact(statement, f"For how long is the {name} laptop guaranteed?", f"{years}-year warranty")
        if kind == 3:
            person = f"{r.choice(FIRST_NAMES)} {self._name()}"
            extension = r.randint(1000, 9999)
            statement = r.choice(
                (
                    f"{person} leads the {name} project; reach them on extension {extension}.",
                    f"Questions about the {name} project go to {person}, who answers on extension {extension}.",
                )
            )
            return Fact(statement, f"Who is in charge of the {name} project?", person)
        if kind == 4:
            floor, seats = r.randint(1, 12), r.randint(4, 40)
            statement = f"The {name} meeting room on floor {floor} has room for {seats} people and a projector."
            return Fact(statement, f"How many people fit in the {name} meeting room?", f"{seats} people")
        amount, item = r.randint(2, 40) * 50, r.choice(ITEMS)
        statement = r.choice(
            (
                f"Members of the {name} team may claim up to {amount} euros a year for {item}.",
                f"The {name} team has a yearly budget of {amount} euros per person for {item}.",
            )
        )
        return Fact(statement, f"How much money does the {name} team get for {item}?", f"{amount} euros")

    def filler(self) -> str:
        r = self.random
        return (
            f"{r.choice(FILLER_SUBJECTS)} {r.choice(FILLER_VERBS)} {r.choice(FILLER_OBJECTS)} "
            f"{r.choice(FILLER_REASONS)}."
        )

    def page(
        self, facts_per_page: int = 3, fillers_per_fact: int = 4, policy: Fact | None = None
    ) -> tuple[list[str], list[Fact]]:
        """A page of paragraphs (a fact and its surrounding sentences each) and the facts it states."""
        facts = [self.fact() for _ in range(facts_per_page)] + ([policy] if policy else [])
        paragraphs = []
        for fact in facts:
            sentences = [self.filler() for _ in range(fillers_per_fact)]
            sentences.insert(self.random.randrange(len(sentences) + 1), fact.statement)
            paragraphs.append(" ".join(sentences))
        return paragraphs, facts


def write_handbook(
    folder: Path, pdf_files: int, pages_per_pdf: int, markdown_files: int, sections_per_markdown: int, seed: int = 7
) -> tuple[list[Path], list[PlacedFact]]:
    """The handbook as PDF and Markdown files in ``folder``, and every fact with where it is stated."""
    handbook = Handbook(seed)
    total_pages = pdf_files * pages_per_pdf + markdown_files * sections_per_markdown
    policy_pages = dict(zip(handbook.random.sample(range(total_pages), min(len(POLICIES), total_pages)), POLICIES))
    page_index = iter(range(total_pages))
    files: list[Path] = []
    placed: list[PlacedFact] = []
    for number in range(1, pdf_files + 1):
        name = f"handbook-part-{number}.pdf"
        pages = []
        for page_number in range(1, pages_per_pdf + 1):
            paragraphs, facts = handbook.page(policy=policy_pages.get(next(page_index)))
            pages.append([f"Chapter {number}, page {page_number}", *paragraphs])
            placed.extend(PlacedFact(fact, name, page_number, None) for fact in facts)
        files.append(write_pdf(folder / name, pages))
    for number in range(1, markdown_files + 1):
        name = f"policies-{number}.md"
        lines = [f"# Policies, volume {number}", ""]
        for section_number in range(1, sections_per_markdown + 1):
            paragraphs, facts = handbook.page(policy=policy_pages.get(next(page_index)))
            heading = f"Policy {number}.{section_number}"
            lines += [f"## {heading}", "", *(line for paragraph in paragraphs for line in (paragraph, ""))]
            section = f"Policies, volume {number} > {heading}"
            placed.extend(PlacedFact(fact, name, None, section) for fact in facts)
        (folder / name).write_text("\n".join(lines))
        files.append(folder / name)
    return files, placed
