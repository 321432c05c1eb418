"""Sentence segmenters on WikiText paragraphs: speed (sentences/s, one process) and 50 random boundaries each.

    .venv/bin/python bench/bench_segmenters.py --file ../shared/data/wikitext-2/wiki.valid.tokens

Each candidate segments the same cleaned WikiText paragraphs (headings dropped, ` @-@ ` joined back) for up
to `--seconds`; the rate is sentences per second of wall time. The boundaries are printed as
`... left | right ...` so a reader can judge them; the JSON keeps rates and boundaries.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain_documents import ARTICLE_HEADING, SUBHEADING, clean_wikitext  # noqa: E402


def candidates() -> dict[str, object]:
    """name -> function(paragraph) -> list of sentences, for each candidate that imports."""
    found = {}
    try:
        import blingfire

        found["blingfire"] = lambda text: blingfire.text_to_sentences(text).split("\n")
    except ImportError:
        pass
    try:
        import pysbd

        pysbd_segmenter = pysbd.Segmenter(language="en", clean=False)
        found["pysbd"] = pysbd_segmenter.segment
    except ImportError:
        pass
    try:
        from syntok import segmenter as syntok_segmenter

        found["syntok"] = lambda text: [
            "".join(token.spacing + token.value for token in sentence).strip()
            for paragraph in syntok_segmenter.analyze(text)
            for sentence in paragraph
        ]
    except ImportError:
        pass
    try:
        import sentencex

        found["sentencex"] = lambda text: list(sentencex.segment("en", text))
    except ImportError:
        pass
    return found


def paragraphs(path: str) -> list[str]:
    lines = (clean_wikitext(line) for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not ARTICLE_HEADING.match(line) and not SUBHEADING.match(line)]


def measure(segment, texts: list[str], seconds: float) -> tuple[list[list[str]], float]:
    done: list[list[str]] = []
    start = time.perf_counter()
    for text in texts:
        done.append([s.strip() for s in segment(text) if s.strip()])
        if time.perf_counter() - start > seconds:
            break
    return done, time.perf_counter() - start


def sample_boundaries(segmented: list[list[str]], count: int, seed: int) -> list[str]:
    pairs = [(a, b) for sentences in segmented for a, b in zip(sentences, sentences[1:], strict=False)]
    chosen = random.Random(seed).sample(pairs, min(count, len(pairs)))
    return [f"... {a[-45:]} | {b[:45]} ..." for a, b in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--file", default="../shared/data/wikitext-2/wiki.valid.tokens")
    parser.add_argument("--seconds", type=float, default=20.0, help="time budget per candidate")
    parser.add_argument("--boundaries", type=int, default=50)
    parser.add_argument("--output", default="bench/results/bench_segmenters.json")
    args = parser.parse_args(argv)
    texts = paragraphs(args.file)
    results = {}
    for name, segment in candidates().items():
        segmented, elapsed = measure(segment, texts, args.seconds)
        sentences = sum(len(s) for s in segmented)
        results[name] = {
            "version": version(name),
            "paragraphs": len(segmented),
            "sentences": sentences,
            "seconds": round(elapsed, 3),
            "sentences_per_second": round(sentences / elapsed),
            "sentences_per_paragraph": round(sentences / len(segmented), 3),
            "boundaries": sample_boundaries(segmented, args.boundaries, seed=0),
        }
        print(
            f"## {name} {version(name)}: {results[name]['sentences_per_second']:,} sentences/s "
            f"({sentences} sentences in {len(segmented)} paragraphs, {elapsed:.1f} s)"
        )
        for line in results[name]["boundaries"]:
            print("   ", line)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"file": args.file, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
