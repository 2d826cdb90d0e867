"""Build the corpus, tokenizer and token arrays for the embedded default model.

The corpus is the Python standard library of the interpreter running this
script (every ``*.py`` file under the directory of ``os.__file__``, minus test
suites and site-packages), sorted by relative path.  Files -- never lines --
are split by a stable SHA-1 hash of their relative path into train (~94 %),
validation (~3 %) and held-out eval (~3 %), see ``stdlib_corpus.py``.

Outputs (default ``.cache/embedded_data/``):

* ``tokenizer/``: byte-level BPE (vocab 4096) trained on the train files only,
  saved as a ``transformers.PreTrainedTokenizerFast`` folder;
* ``train.npy`` / ``validation.npy``: flat ``uint16`` token arrays in which
  every document is preceded by ``<|endoftext|>``;
* ``{train,validation,eval}_files.txt`` and ``meta.json`` (provenance, counts
  and checksums).

It also writes the held-out file list to ``moepatch/data/heldout_files.txt``,
from which ``make_tasks.py`` builds the offline lm-eval tasks.

The corpus depends on the local Python version, so run this on the machine
whose stdlib defines the corpus (CPython 3.11.7 for the shipped model) and copy
the output directory to the training machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

# Sibling module: a script's own directory is first on sys.path.
import stdlib_corpus

REPO_ROOT = Path(__file__).resolve().parents[2]
EOT = "<|endoftext|>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Prepare the stdlib corpus, BPE tokenizer and token arrays for the embedded MoE model."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / ".cache" / "embedded_data",
        help="output directory for tokenizer/, train.npy, validation.npy, file lists and meta.json "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--stdlib-dir",
        type=Path,
        default=stdlib_corpus.default_stdlib_dir(),
        help="standard library directory to read (default: directory of os.__file__, %(default)s)",
    )
    parser.add_argument(
        "--heldout-list",
        type=Path,
        default=REPO_ROOT / "moepatch" / "data" / "heldout_files.txt",
        help="where to write the held-out eval file list (default: %(default)s)",
    )
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: %(default)s)")
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="minimum pair frequency for a BPE merge (default: %(default)s)"
    )
    return parser.parse_args(argv)


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int):
    """Train a GPT-2 style byte-level BPE tokenizer on ``texts``.

    Byte-level BPE needs no unknown token and round-trips any text exactly,
    which matters for lm-eval's byte/word perplexities.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: source files do not start with a space, and a
    # prefix space would make decode(encode(x)) != x.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        # Seed all 256 byte symbols so that every input is encodable even if
        # some byte never occurs in the training files.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def wrap_tokenizer(tokenizer):
    """Wrap a raw ``tokenizers.Tokenizer`` as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        # The model is trained on 256-token windows with 512 positions.
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(fast, dest: Path) -> None:
    """Save ``fast`` as a portable ``PreTrainedTokenizerFast`` folder.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and no
    ``special_tokens_map.json``; naming the public ``PreTrainedTokenizerFast``
    class and writing the map keeps the folder loadable by every transformers
    release that has ``AutoTokenizer`` (4.x included), while 5.x maps the class
    name back to its tokenizers backend.
    """
    dest.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(dest))
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special = {name: EOT for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (dest / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def encode_documents(tokenizer, texts: list[str], eot_id: int) -> np.ndarray:
    """Encode documents into one flat uint16 array, each preceded by EOT.

    A leading EOT on every document matches what lm-eval's rolling
    log-likelihood feeds the model before a document (the EOT prefix token).
    """
    pieces = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        pieces.append(np.asarray([eot_id], dtype=np.uint16))
        pieces.append(np.asarray(enc.ids, dtype=np.uint16))
    if not pieces:
        return np.zeros(0, dtype=np.uint16)
    return np.concatenate(pieces)


def sha1_file(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.vocab_size > 65535:
        raise SystemExit("--vocab-size must fit in uint16")
    start = time.time()
    stdlib_dir = args.stdlib_dir.resolve()
    files = stdlib_corpus.list_stdlib_files(stdlib_dir)
    splits = stdlib_corpus.split_files(files)
    texts = {name: [stdlib_corpus.read_source(stdlib_dir, rel) for rel in rels] for name, rels in splits.items()}

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name, rels in splits.items():
        (out / f"{name}_files.txt").write_text("".join(f"{rel}\n" for rel in rels), encoding="utf-8")
    args.heldout_list.parent.mkdir(parents=True, exist_ok=True)
    args.heldout_list.write_text("".join(f"{rel}\n" for rel in splits["eval"]), encoding="utf-8")

    raw_tokenizer = train_tokenizer(texts["train"], args.vocab_size, args.min_frequency)
    eot_id = raw_tokenizer.token_to_id(EOT)
    fast = wrap_tokenizer(raw_tokenizer)
    save_tokenizer(fast, out / "tokenizer")

    counts = {}
    for name in ("train", "validation"):
        arr = encode_documents(raw_tokenizer, texts[name], eot_id)
        np.save(out / f"{name}.npy", arr)
        counts[name] = {
            "files": len(splits[name]),
            "chars": sum(len(t) for t in texts[name]),
            "tokens": int(arr.size),
        }
    counts["eval"] = {"files": len(splits["eval"]), "chars": sum(len(t) for t in texts["eval"])}

    meta = {
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib_dir": str(stdlib_dir),
        "split_rule": "bucket = int(sha1(relpath)[:8], 16) % 100; <94 train, <97 validation, else eval",
        "vocab_size": raw_tokenizer.get_vocab_size(),
        "eot_token": EOT,
        "eot_id": eot_id,
        "dtype": "uint16",
        "counts": counts,
        "sha1": {
            name: sha1_file(out / f"{name}.npy") for name in ("train", "validation")
        }
        | {"tokenizer.json": sha1_file(out / "tokenizer" / "tokenizer.json")},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    total_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    chars_per_token = counts["train"]["chars"] / max(1, counts["train"]["tokens"])
    print(
        f"prepared {len(files)} files (train {counts['train']['files']}, validation "
        f"{counts['validation']['files']}, eval {counts['eval']['files']}) from {stdlib_dir} "
        f"[Python {meta['python_version']}]"
    )
    print(
        f"tokens: train {counts['train']['tokens']:,}, validation {counts['validation']['tokens']:,} "
        f"({chars_per_token:.2f} chars/token); wrote {total_bytes / 1e6:.1f} MB to {out} "
        f"in {time.time() - start:.1f}s"
    )
    print(f"held-out file list: {args.heldout_list}")


if __name__ == "__main__":
    sys.exit(main())
