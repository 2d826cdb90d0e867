"""Build the offline lm-eval tasks ``stdlib_ppl`` and ``stdlib_cloze`` from held-out files.

Both tasks are made only from the held-out eval files listed in
``moepatch/data/heldout_files.txt`` (written by ``prepare.py``), which the
embedded model never sees during training:

* ``stdlib_ppl.jsonl``: each held-out file cut at line boundaries into
  documents of roughly 1500-3000 characters, scored with
  ``loglikelihood_rolling`` (word/byte perplexity, bits per byte);
* ``stdlib_cloze.jsonl``: 4-way multiple choice.  The context is 8-15
  consecutive lines of a held-out file, the gold choice is the next non-blank
  line, and the three distractors are lines of similar length drawn from the
  *other* held-out files.  All sampling uses a fixed seed.

A ``manifest.json`` records counts, the seed, the Python version whose stdlib
was read and a checksum of every held-out file, so a rebuild on a different
interpreter is detectable.  Output is byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import sys
from pathlib import Path

# Sibling module: a script's own directory is first on sys.path.
import stdlib_corpus

REPO_ROOT = Path(__file__).resolve().parents[2]

# Document sizes for the perplexity task (characters, cut at line boundaries).
PPL_TARGET_CHARS = 1800
PPL_MIN_CHARS = 1500
PPL_MAX_CHARS = 3000
# Cloze items: context length in lines, choices, answer line length bounds.
CLOZE_MIN_CONTEXT = 8
CLOZE_MAX_CONTEXT = 15
CLOZE_CHOICES = 4
CLOZE_MIN_ANSWER_CHARS = 6
CLOZE_MAX_ANSWER_CHARS = 100
# Items from one file and distance between two items' answer lines; both keep
# a few long files (e.g. the codec tables) from dominating the task.
CLOZE_MAX_PER_FILE = 40
CLOZE_MIN_GAP_LINES = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Build the stdlib_ppl and stdlib_cloze lm-eval task data from the held-out stdlib files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--stdlib-dir", type=Path, default=stdlib_corpus.default_stdlib_dir(),
                   help="standard library directory the held-out files are read from")
    p.add_argument("--heldout-list", type=Path, default=REPO_ROOT / "moepatch" / "data" / "heldout_files.txt",
                   help="held-out file list written by prepare.py")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "moepatch" / "data" / "tasks",
                   help="where to write stdlib_ppl.jsonl, stdlib_cloze.jsonl and manifest.json")
    p.add_argument("--cloze-items", type=int, default=500, help="number of cloze items")
    p.add_argument("--seed", type=int, default=20240611, help="seed for all sampling")
    return p.parse_args(argv)


def chunk_lines(lines: list[str]) -> list[tuple[int, int]]:
    """Cut a file's lines into [start, end) ranges of ~1500-3000 characters.

    A chunk closes once it reaches ``PPL_TARGET_CHARS`` (or before a line
    would push it past ``PPL_MAX_CHARS``).  A short tail is merged into the
    previous chunk when that stays within the maximum and dropped when it is
    too short to be a meaningful document; a whole short file is kept if it
    has at least ``PPL_MIN_CHARS / 2`` characters.
    """
    ranges, start, size = [], 0, 0
    for i, line in enumerate(lines):
        if size and size + len(line) > PPL_MAX_CHARS:
            ranges.append((start, i))
            start, size = i, 0
        size += len(line)
        if size >= PPL_TARGET_CHARS:
            ranges.append((start, i + 1))
            start, size = i + 1, 0
    if size:
        if ranges and size < PPL_MIN_CHARS:
            prev_start, prev_end = ranges[-1]
            prev_size = sum(len(x) for x in lines[prev_start:prev_end])
            if prev_size + size <= PPL_MAX_CHARS:
                ranges[-1] = (prev_start, len(lines))
            elif size >= PPL_MIN_CHARS // 2:
                ranges.append((start, len(lines)))
        elif size >= PPL_MIN_CHARS // 2:
            ranges.append((start, len(lines)))
    return ranges


def make_ppl_docs(files: dict[str, list[str]]) -> list[dict]:
    docs = []
    for rel, lines in files.items():
        for start, end in chunk_lines(lines):
            text = "".join(lines[start:end])
            if not text.strip():
                continue
            docs.append({
                "id": f"stdlib_ppl-{len(docs):04d}",
                "source": rel,
                "start_line": start + 1,
                "end_line": end,
                "text": text,
            })
    return docs


def is_answer_line(line: str) -> bool:
    """Lines worth predicting: some alphanumeric content, bounded length."""
    body = line.strip()
    return (
        CLOZE_MIN_ANSWER_CHARS <= len(body)
        and len(line.rstrip("\n")) <= CLOZE_MAX_ANSWER_CHARS
        and any(c.isalnum() for c in body)
    )


def pick_distractors(rng: random.Random, gold: str, pool: list[tuple[str, str]], source: str) -> list[str]:
    """Sample distractor lines of similar length from files other than ``source``.

    The length window starts at +-15 % (at least 3 characters) and doubles
    until enough candidates exist, so long and short gold lines both get
    length-matched distractors and ``acc`` cannot be won by length alone.
    """
    gold_body = gold.strip()
    n = len(gold)
    tol = max(3, int(0.15 * n))
    while True:
        cands = [
            line for src, line in pool
            if src != source and abs(len(line) - n) <= tol and line.strip() != gold_body
        ]
        # Deduplicate by content but keep the deterministic pool order.
        seen, unique = set(), []
        for line in cands:
            key = line.strip()
            if key not in seen:
                seen.add(key)
                unique.append(line)
        if len(unique) >= CLOZE_CHOICES - 1 or tol > 200:
            break
        tol *= 2
    return rng.sample(unique, CLOZE_CHOICES - 1)


def make_cloze_items(files: dict[str, list[str]], n_items: int, rng: random.Random) -> list[dict]:
    # Distractor pool: every answer-worthy line of every held-out file, as
    # (source, line) in file/line order so sampling is reproducible.
    pool = [(rel, line.rstrip("\n")) for rel, lines in files.items() for line in lines if is_answer_line(line)]

    candidates = []
    for rel, lines in files.items():
        for j in range(CLOZE_MIN_CONTEXT, len(lines)):
            if is_answer_line(lines[j]):
                candidates.append((rel, j))
    rng.shuffle(candidates)

    taken: dict[str, list[int]] = {rel: [] for rel in files}
    items = []
    for rel, j in candidates:
        if len(items) >= n_items:
            break
        if len(taken[rel]) >= CLOZE_MAX_PER_FILE:
            continue
        if any(abs(j - other) < CLOZE_MIN_GAP_LINES for other in taken[rel]):
            continue
        lines = files[rel]
        k = rng.randint(CLOZE_MIN_CONTEXT, CLOZE_MAX_CONTEXT)
        start = max(0, j - k)
        context_lines = lines[start:j]
        # The gold line is the next *non-blank* line: blank lines directly
        # before it stay in the context, but need enough real content.
        if sum(1 for x in context_lines if x.strip()) < CLOZE_MIN_CONTEXT // 2:
            continue
        gold = lines[j].rstrip("\n")
        distractors = pick_distractors(rng, gold, pool, rel)
        label = rng.randrange(CLOZE_CHOICES)
        choices = distractors[:label] + [gold] + distractors[label:]
        taken[rel].append(j)
        items.append({
            "source": rel,
            "line": j + 1,
            "context": "".join(context_lines),
            # Each choice is a whole line including indentation and newline.
            "choices": [c + "\n" for c in choices],
            "label": label,
        })
    if len(items) < n_items:
        raise SystemExit(f"only {len(items)} cloze items could be built (wanted {n_items})")
    items.sort(key=lambda it: (it["source"], it["line"]))
    return [{"id": f"stdlib_cloze-{i:04d}", **it} for i, it in enumerate(items)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rels = [line.strip() for line in args.heldout_list.read_text(encoding="utf-8").splitlines() if line.strip()]
    wrong = [rel for rel in rels if stdlib_corpus.split_of(rel) != "eval"]
    if wrong:
        raise SystemExit(f"files in {args.heldout_list} are not in the eval split: {wrong}")
    missing = [rel for rel in rels if not (args.stdlib_dir / rel).is_file()]
    if missing:
        raise SystemExit(f"held-out files missing under {args.stdlib_dir}: {missing}")

    texts = {rel: stdlib_corpus.read_source(args.stdlib_dir, rel) for rel in sorted(rels)}
    files = {rel: text.splitlines(keepends=True) for rel, text in texts.items()}
    # Make the last line of every file newline-terminated so choices and
    # chunks are uniform.
    for lines in files.values():
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"

    rng = random.Random(args.seed)
    ppl_docs = make_ppl_docs(files)
    cloze = make_cloze_items(files, args.cloze_items, rng)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "stdlib_ppl.jsonl", ppl_docs)
    write_jsonl(args.out_dir / "stdlib_cloze.jsonl", cloze)
    manifest = {
        "python_version": platform.python_version(),
        "seed": args.seed,
        "heldout_files": {rel: hashlib.sha1(text.encode("utf-8")).hexdigest() for rel, text in texts.items()},
        "stdlib_ppl": {"docs": len(ppl_docs), "chars": sum(len(d["text"]) for d in ppl_docs)},
        "stdlib_cloze": {"items": len(cloze), "choices": CLOZE_CHOICES,
                         "label_counts": [sum(1 for it in cloze if it["label"] == i) for i in range(CLOZE_CHOICES)]},
    }
    (args.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    size = sum((args.out_dir / n).stat().st_size for n in ("stdlib_ppl.jsonl", "stdlib_cloze.jsonl", "manifest.json"))
    lengths = sorted(len(d["text"]) for d in ppl_docs)
    print(f"stdlib_ppl: {len(ppl_docs)} docs from {len(files)} files "
          f"(chars min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]})")
    print(f"stdlib_cloze: {len(cloze)} items, label counts {manifest['stdlib_cloze']['label_counts']}")
    print(f"wrote {size / 1e3:.0f} kB to {args.out_dir}")


if __name__ == "__main__":
    sys.exit(main())
