"""Draw the Banking77 subset that ships inside the package for the demo (``data.dataset=banking77-demo``).

Banking77 (Casanueva et al., 2020, PolyAI-LDN/task-specific-datasets, CC BY 4.0) has 10,003 training and
3,080 test utterances over 77 intents. The demo keeps ``--train`` training and ``--test`` test utterances of
every intent, drawn without replacement from the official splits with ``numpy_rng(seed, "banking77-demo",
split, intent)``; rows are written intent by intent (intents sorted by name), in their original order within
an intent, as ``text,category`` CSV (UTF-8, ``\\n`` line ends). The output is deterministic: same source,
counts and seed -> the same bytes; the SHA-256 of each file is written into the folder's README.md and
printed.

``--val-out DIR`` also writes a *validation* set (``DIR/train.csv`` = the shipped training rows,
``DIR/test.csv`` = ``--val`` other training utterances per intent, never shipped, never test data): the
demo's settings were chosen on it (``data.dataset=banking77 data.root=DIR``), not on test accuracy.

Usage (from the repository root; SOURCE holds Banking77's ``train.csv`` and ``test.csv``)::

    PYTHONPATH=src python benchmarks/make_demo_data.py SOURCE            # rewrite the package data
    PYTHONPATH=src python benchmarks/make_demo_data.py SOURCE --check    # verify it, write nothing
    PYTHONPATH=src python benchmarks/make_demo_data.py SOURCE --val-out /tmp/b77-val
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import sys
from collections import defaultdict
from pathlib import Path

from fedtalora.seeding import numpy_rng

OUT = Path(__file__).resolve().parents[1] / "src" / "fedtalora" / "data" / "banking77_demo"
TRAIN_PER_INTENT = 24
TEST_PER_INTENT = 8
SEED = 0

README = """\
# Banking77 demo subset

A small, fixed subset of **Banking77** used by fedtalora's demo (`data.dataset: banking77-demo`): all
77 intents, {train} training and {test} test utterances per intent ({n_train:,} + {n_test:,} rows).

- Source: Banking77, I. Casanueva, T. Temčinas, D. Gerz, M. Henderson, I. Vulić, "Efficient Intent Detection
  with Dual Sentence Encoders", Proceedings of the 2nd Workshop on NLP for ConvAI, ACL 2020;
  https://github.com/PolyAI-LDN/task-specific-datasets (`banking_data/train.csv`, `banking_data/test.csv`).
- Licence: Creative Commons Attribution 4.0 International (CC BY 4.0), https://creativecommons.org/licenses/by/4.0/
  (see LICENSE). The utterances are unchanged; the only modification is the selection of rows.
- How it was drawn: `benchmarks/make_demo_data.py` (seed {seed}): for every intent, {train} rows of the official
  training split and {test} rows of the official test split, uniformly without replacement; rows grouped by
  intent (sorted by name), in their original order within an intent. Columns `text,category`.

SHA-256:

- `train.csv` {sha_train}
- `test.csv` {sha_test}
"""

LICENSE = """\
The files train.csv and test.csv in this folder are a subset of the Banking77 dataset
(https://github.com/PolyAI-LDN/task-specific-datasets), Copyright PolyAI Limited,
by I. Casanueva, T. Temčinas, D. Gerz, M. Henderson and I. Vulić (2020), licensed under the
Creative Commons Attribution 4.0 International License (CC BY 4.0).

Changes: a seeded selection of rows (see README.md); the texts and labels are unchanged.

You may share and adapt this material for any purpose, provided you give appropriate credit,
provide a link to the licence, and indicate if changes were made.
Full licence text: https://creativecommons.org/licenses/by/4.0/legalcode
"""


def read_rows(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return [(row["text"], row["category"].strip()) for row in csv.DictReader(f)]


def draw(rows: list[tuple[str, str]], per_intent: int, split: str, seed: int,
         exclude: set[int] | None = None) -> list[int]:
    """Indices of ``per_intent`` rows of every intent (original order within an intent, intents sorted)."""
    by_intent: dict[str, list[int]] = defaultdict(list)
    for i, (_, intent) in enumerate(rows):
        if exclude is None or i not in exclude:
            by_intent[intent].append(i)
    chosen: list[int] = []
    for intent in sorted(by_intent):
        pool = by_intent[intent]
        if len(pool) < per_intent:
            sys.exit(f"{split}: intent {intent!r} has only {len(pool)} rows, {per_intent} asked")
        pick = numpy_rng(seed, "banking77-demo", split, intent).choice(len(pool), per_intent, replace=False)
        chosen.extend(pool[j] for j in sorted(pick.tolist()))
    return chosen


def to_csv(rows: list[tuple[str, str]], indices: list[int]) -> bytes:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text", "category"])
    writer.writerows(rows[i] for i in indices)
    return buf.getvalue().encode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", type=Path, help="folder with Banking77's train.csv and test.csv")
    ap.add_argument("--train", type=int, default=TRAIN_PER_INTENT, help="training utterances per intent")
    ap.add_argument("--test", type=int, default=TEST_PER_INTENT, help="test utterances per intent")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out", type=Path, default=OUT, help="where to write (default: the package folder)")
    ap.add_argument("--check", action="store_true", help="verify the files in --out; write nothing")
    ap.add_argument("--val-out", type=Path, default=None,
                    help="also write a validation set (train = the subset, test = other training rows) here")
    ap.add_argument("--val", type=int, default=10, help="validation utterances per intent (with --val-out)")
    args = ap.parse_args()

    train_rows = read_rows(args.source / "train.csv")
    test_rows = read_rows(args.source / "test.csv")
    train_idx = draw(train_rows, args.train, "train", args.seed)
    test_idx = draw(test_rows, args.test, "test", args.seed)
    files = {"train.csv": to_csv(train_rows, train_idx), "test.csv": to_csv(test_rows, test_idx)}
    files["README.md"] = README.format(
        train=args.train, test=args.test, n_train=len(train_idx), n_test=len(test_idx), seed=args.seed,
        sha_train=sha256(files["train.csv"]), sha_test=sha256(files["test.csv"])).encode("utf-8")
    files["LICENSE"] = LICENSE.encode("utf-8")
    intents = len({train_rows[i][1] for i in train_idx})
    if args.check:
        bad = [name for name, data in files.items()
               if not (args.out / name).is_file() or (args.out / name).read_bytes() != data]
        for name in bad:
            print(f"{args.out / name}: differs from what {Path(__file__).name} draws", file=sys.stderr)
        if not bad:
            print(f"{args.out}: up to date ({intents} intents, {len(train_idx)} train / {len(test_idx)} test rows)")
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / name).write_bytes(data)
    total = sum(len(d) for d in files.values())
    print(f"wrote {args.out}: {intents} intents, {len(train_idx)} train / {len(test_idx)} test rows, {total:,} bytes")
    for name in ("train.csv", "test.csv"):
        print(f"  {name} sha256 {sha256(files[name])}")
    if args.val_out is not None:
        val_idx = draw(train_rows, args.val, "val", args.seed, exclude=set(train_idx))
        args.val_out.mkdir(parents=True, exist_ok=True)
        (args.val_out / "train.csv").write_bytes(files["train.csv"])
        (args.val_out / "test.csv").write_bytes(to_csv(train_rows, val_idx))
        print(f"wrote the validation set to {args.val_out}: {len(val_idx)} held-out training rows as test.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
