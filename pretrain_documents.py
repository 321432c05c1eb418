"""Documents from any text layout, and their sentences.

`--document_format` says where one document ends and the next begins:

- `wikitext`: WikiText's one paragraph per line; a ` = Title = ` line starts an article, ` = = Section = = `
  sub-headings stay inside it, and ` @-@ `, ` @,@ `, ` @.@ ` are joined back.
- `rows`: every row is a document: a json/jsonl/csv/parquet record, a Hub dataset row (Wikipedia dumps,
  BookCorpusOpen, OpenWebText, C4, FineWeb), or a line of a text file.
- `blank_lines`: BERT's and ELECTRA's pretraining text: one sentence (or paragraph) per line, a blank line
  between documents.
- `auto` (the default): `rows` for json/csv/parquet files; for text lines and Hub datasets, `wikitext`
  when the first lines hold a ` = Title = ` heading, else `blank_lines` when they hold a blank line, else
  `rows`. The choice and its reason are logged.

A document is stored as one string whose lines are its paragraphs (or sentences); `split_sentences` cuts
each line into sentences with sentencex (Wikimedia's rule-based segmenter; why this one:
docs/pretraining.md#data-at-corpus-scale).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

DOCUMENT_FORMATS = ("auto", "wikitext", "rows", "blank_lines")
# Lines (rows) that `auto` looks at.
SNIFF_LINES = 2000
# Lines read from the raw dataset per batch while grouping lines into documents.
GROUPING_BATCH_LINES = 10_000
# Documents the grouper's Arrow writer holds before it writes them (datasets' default, 10,000, would hold
# a whole WikiText-2 x 20 in memory).
DOCUMENT_WRITER_BATCH = 64
# WikiText splits hyphens and number separators into " @-@ ", " @,@ ", " @.@ "; undo it before tokenizing.
WIKITEXT_JOINERS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}
# A top-level heading is " = Title = "; sub-headings (" = = Section = = ") continue the article.
ARTICLE_HEADING = re.compile(r"^= (?!=)(.*?) =$")
SUBHEADING = re.compile(r"^(?:= ){2,}(.*?)(?: =){2,}$")
SEGMENTER = "sentencex"
SEGMENTER_LANGUAGE = "en"


def segmenter_version() -> str:
    return version(SEGMENTER)


def clean_wikitext(text: str) -> str:
    for marker, joined in WIKITEXT_JOINERS.items():
        text = text.replace(marker, joined)
    return text.strip()


def group_into_articles(lines: Iterable[str | None]) -> Iterator[str]:
    """Regroup WikiText's one-paragraph-per-line layout into one string per article.

    A ` = Title = ` line starts a new article (the title becomes its first line); ` = = Section = = `
    sub-headings keep their words and stay inside the current article. Empty lines are dropped.
    """
    current: list[str] = []
    for line in lines:
        text = clean_wikitext(line or "")
        if not text:
            continue
        heading = ARTICLE_HEADING.match(text)
        if heading:
            if current:
                yield "\n".join(current)
            current = [heading.group(1)]
            continue
        subheading = SUBHEADING.match(text)
        current.append(subheading.group(1) if subheading else text)
    if current:
        yield "\n".join(current)


def group_at_blank_lines(lines: Iterable[str | None]) -> Iterator[str]:
    """BERT/ELECTRA pretraining text: the lines between blank lines make one document."""
    current: list[str] = []
    for line in lines:
        text = (line or "").strip()
        if text:
            current.append(text)
        elif current:
            yield "\n".join(current)
            current = []
    if current:
        yield "\n".join(current)


GROUPERS = {"wikitext": group_into_articles, "blank_lines": group_at_blank_lines}


def choose_document_format(requested: str, builder: str, sample: list[str | None]) -> tuple[str, str]:
    """`(format, reason)`: the requested one, or what `auto` infers from the builder and the first lines."""
    if requested != "auto":
        return requested, "--document_format"
    if builder in ("json", "csv", "parquet"):
        return "rows", f"{builder} records are documents"
    lines = [clean_wikitext(line or "") for line in sample]
    if any(ARTICLE_HEADING.match(line) for line in lines):
        return "wikitext", "the first lines hold a ' = Title = ' heading"
    if any(not line for line in lines):
        return "blank_lines", "the first lines hold a blank line (one document between blank lines)"
    return "rows", "the first lines hold no heading and no blank line (one document per line)"


def iter_column(dataset: Any, column: str) -> Iterator[str | None]:
    """A raw dataset's text column, read in batches (memory-mapped, never the whole column at once)."""
    for batch in dataset.iter(batch_size=GROUPING_BATCH_LINES):
        yield from batch[column]


def documents_dataset(raw_split: Any, column: str, document_format: str, scratch: Path) -> Any:
    """The split's documents as a `datasets.Dataset` with one `text` column (one row per document).

    `rows` keeps the raw rows (no copy); `wikitext` and `blank_lines` stream the lines through their
    grouper into an Arrow file under `scratch`, so no step holds the corpus as Python strings.
    """
    import datasets
    from datasets.arrow_writer import ArrowWriter

    if document_format == "rows":
        documents = raw_split.select_columns([column])
        return documents if column == "text" else documents.rename_column(column, "text")
    path = scratch / f"documents-{document_format}.arrow"
    features = datasets.Features({"text": datasets.Value("string")})
    with ArrowWriter(features=features, path=str(path), writer_batch_size=DOCUMENT_WRITER_BATCH) as writer:
        for document in GROUPERS[document_format](iter_column(raw_split, column)):
            writer.write({"text": document})
        writer.finalize()
    return datasets.Dataset.from_file(str(path))


def split_sentences(document: str) -> list[str]:
    """A document's sentences: each line (paragraph) cut by sentencex; a line never spans two sentences."""
    import sentencex

    sentences = []
    for line in document.split("\n"):
        line = line.strip()
        if line:
            sentences += [s.strip() for s in sentencex.segment(SEGMENTER_LANGUAGE, line) if s.strip()]
    return sentences
