"""Write the small offline sample that `make demo` runs on (the files beside this script).

The text is generated from templates, so it can be shipped with the repository: a WikiText-style corpus
(` = Title = ` articles, one paragraph per line) for pretraining, and two GLUE tasks in their original
layouts that a model can learn from that vocabulary (film articles quote reviews): SST-2 (sentiment with negation) and STS-B (sentence
similarity scored by how many content words two sentences share). Run it again to regenerate the same
files: the generator is seeded.
"""

import argparse
import csv
import random
import sys
from pathlib import Path

SEED = 1234
NUM_ARTICLES = {"wiki.train.tokens": 120, "wiki.valid.tokens": 12}
GLUE_ROWS = {"train": 1200, "dev": 200, "test": 200}
MAX_STSB_SCORE = 5.0
FILM_ARTICLE_SHARE = 0.3
REVIEW_SENTENCE_SHARE = 0.6

NAMES = "anna boris clara david elena felix greta hugo irene jonas karla leon maria nils olga peter rosa sven tina victor".split()
PLACES = "london paris berlin vienna rome madrid dublin oslo prague lisbon warsaw athens".split()
NOUNS = (
    "city river church castle bridge school museum garden harbour village market station library forest "
    "mountain island valley tower theatre palace road farm mill lake"
).split()
ANIMALS = "cat dog horse bird fox wolf bear deer owl fish".split()
FILM_NOUNS = "film movie story plot script cast ending score soundtrack performance".split()
POSITIVE = "good great wonderful brilliant moving charming clever beautiful funny delightful".split()
NEGATIVE = "bad dull boring weak clumsy tedious awful flat silly painful".split()
NEUTRAL_ADJ = "old new large small northern southern famous quiet busy ancient".split()
VERBS = "built visited described painted restored opened founded crossed studied praised".split()
YEARS = [str(y) for y in range(1820, 2015, 7)]


def sentence(rng: random.Random, topic: str) -> str:
    templates = [
        "the {adj} {noun} of {place} was {verb} by {name} in {year} .",
        "{name} {verb} the {adj} {noun} near the {noun2} .",
        "in {year} , the {noun} was {verb} and became {adj} .",
        "the {animal} lived near the {adj} {noun} in {place} .",
        "many people {verb} the {noun} , which is {adj} and {adj2} .",
        "{name} wrote that the {topic} was {adj} , and the {noun2} was {adj2} .",
        "the {topic} of {place} is one of the most {adj} in the region .",
    ]
    return rng.choice(templates).format(
        adj=rng.choice(NEUTRAL_ADJ), adj2=rng.choice(NEUTRAL_ADJ), noun=rng.choice(NOUNS), noun2=rng.choice(NOUNS),
        place=rng.choice(PLACES), verb=rng.choice(VERBS), name=rng.choice(NAMES).capitalize(), year=rng.choice(YEARS),
        animal=rng.choice(ANIMALS), topic=topic,
    )  # fmt: skip


def review(rng: random.Random) -> tuple[str, int]:
    """A one-sentence film review; negation flips the adjective's polarity."""
    positive = rng.random() < 0.5
    negated = rng.random() < 0.3
    adjective = rng.choice(POSITIVE if positive != negated else NEGATIVE)
    noun = rng.choice(FILM_NOUNS)
    opener = rng.choice(["", f"{rng.choice(NAMES)} said that ", "overall , ", "in the end , "])
    copula = "is not" if negated else rng.choice(["is", "was", "felt"])
    extra = rng.choice(["", f" , and the {rng.choice(FILM_NOUNS)} was {rng.choice(NEUTRAL_ADJ)}"])
    return f"{opener}the {noun} {copula} {adjective}{extra} .".strip(), int(positive)


def similar_pair(rng: random.Random) -> tuple[str, str, float]:
    """Two sentences whose similarity is the fraction of the five content slots they share, times 5."""
    slots = [
        rng.choice(NAMES),
        rng.choice(VERBS),
        rng.choice(NEUTRAL_ADJ),
        rng.choice(NOUNS),
        rng.choice(PLACES),
    ]
    pools = [NAMES, VERBS, NEUTRAL_ADJ, NOUNS, PLACES]
    changed = rng.randint(0, len(slots))
    other = list(slots)
    for i in rng.sample(range(len(slots)), changed):
        other[i] = rng.choice([w for w in pools[i] if w != slots[i]])
    template = "{0} {1} the {2} {3} in {4} ."
    score = MAX_STSB_SCORE * (len(slots) - changed) / len(slots)
    return template.format(*slots), template.format(*other), score


def paragraph_sentence(rng: random.Random, topic: str, film: bool) -> str:
    if film and rng.random() < REVIEW_SENTENCE_SHARE:
        return review(rng)[0]
    return sentence(rng, topic)


def write_wikitext(out_dir: Path, rng: random.Random) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for filename, num_articles in NUM_ARTICLES.items():
        lines = [" "]
        for _ in range(num_articles):
            # Some articles are about films and quote reviews, so the sentiment words and their negation
            # are in the pretraining text (and the WordPiece vocabulary trained from it), as in WikiText.
            film = rng.random() < FILM_ARTICLE_SHARE
            topic = rng.choice(FILM_NOUNS if film else NOUNS)
            title = (
                f"{rng.choice(NAMES).capitalize()} {topic.capitalize()} of {rng.choice(PLACES).capitalize()}"
            )
            lines += [f" = {title} = ", " "]
            for section in range(rng.randint(2, 4)):
                if section:
                    lines += [
                        f" = = {rng.choice(['History', 'Description', 'Legacy', 'Location'])} = = ",
                        " ",
                    ]
                for _ in range(rng.randint(1, 3)):
                    lines += [
                        " "
                        + " ".join(paragraph_sentence(rng, topic, film) for _ in range(rng.randint(3, 7)))
                        + " ",
                        " ",
                    ]
        (out_dir / filename).write_text("\n".join(lines) + "\n")


def write_tsv(path: Path, header: list[str] | None, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n", escapechar="\\")
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def write_glue(out_dir: Path, rng: random.Random) -> None:
    for split, n in GLUE_ROWS.items():
        reviews = [review(rng) for _ in range(n)]
        if split == "test":
            write_tsv(
                out_dir / "SST-2" / "test.tsv",
                ["index", "sentence"],
                [[i, s] for i, (s, _) in enumerate(reviews)],
            )
        else:
            write_tsv(out_dir / "SST-2" / f"{split}.tsv", ["sentence", "label"], [[s, y] for s, y in reviews])
        pairs = [similar_pair(rng) for _ in range(n)]
        header = [
            "index",
            "genre",
            "filename",
            "year",
            "old_index",
            "source1",
            "source2",
            "sentence1",
            "sentence2",
        ]
        rows = [
            [i, "main-demo", "demo", "2026", f"{i:04d}", "none", "none", a, b]
            for i, (a, b, _) in enumerate(pairs)
        ]
        if split != "test":
            header = header + ["score"]
            rows = [row + [f"{score:.3f}"] for row, (_, _, score) in zip(rows, pairs, strict=True)]
        write_tsv(out_dir / "STS-B" / f"{split}.tsv", header, rows)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=SEED)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_argument_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    write_wikitext(args.output_dir / "wikitext-2", rng)
    write_glue(args.output_dir / "glue_data", rng)
    print(f"wrote the demo sample under {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
