"""Make the committed mini catalog: ~1,000 real product photos over the 20 most common article types.

Deterministic (no randomness: ids are ordered by the SHA-1 of the id), stratified per type, with products
from the train and test splits, plus a handful of the source's real defect rows kept on purpose (titles
with unquoted commas written back unquoted, ids without an image, empty cells) so ingest is exercised on
them. Usage: python scripts/make_mini_catalog.py [--source DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.catalog import iter_csv_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "fashion-product-images-small"
DEFAULT_OUT = ROOT / "data" / "mini-catalog"
OVERFLOW_IDS = ("3413", "4854", "23127")  # real rows whose title has unquoted commas
MISSING_IMAGE_IDS = ("39403", "12347")  # real ids in styles.csv without an image file
EMPTY_CELL_ROWS = 4  # real rows with an empty cell, taken from the selected types


def _order(product_id: str) -> str:
    """Stable pseudo-random order of ids (same on every machine and Python)."""
    return hashlib.sha1(product_id.encode()).hexdigest()


def load_source(source: Path) -> tuple[list[str], list[dict[str, str]], dict[str, str], dict[str, str]]:
    """(header, rows, split by id, raw line by id) of the source catalog, read with the robust reader."""
    report: Counter[str] = Counter()
    header: list[str] = []
    rows = []
    for row_header, row in iter_csv_rows(source / "styles.csv", "productDisplayName", report):
        header = row_header
        rows.append(row)
    with open(source / "splits.csv", newline="", encoding="utf-8") as handle:
        splits = {r["id"]: r["split"] for r in csv.DictReader(handle)}
    raw = {}
    for line in (source / "styles.csv").read_text(encoding="utf-8").splitlines()[1:]:
        raw[line.split(",", 1)[0]] = line
    return header, rows, splits, raw


def select_ids(rows: list[dict[str, str]], splits: dict[str, str], images: Path, types: int,
               per_type: int, test_per_type: int) -> list[str]:
    """Per article type (the `types` most common): `test_per_type` test ids, the rest from train."""
    has_image = [r for r in rows if (images / f"{r['id']}.jpg").is_file() and all(v.strip() for v in r.values())]
    counts = Counter(r["articleType"] for r in has_image)
    chosen = []
    for article_type, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:types]:
        by_split: dict[str, list[str]] = defaultdict(list)
        for r in has_image:
            if r["articleType"] == article_type:
                by_split[splits[r["id"]]].append(r["id"])
        test = sorted(by_split["test"], key=_order)[:test_per_type]
        train = sorted(by_split["train"], key=_order)[:per_type - len(test)]
        chosen.extend(test + train)
    return chosen


def defect_ids(rows: list[dict[str, str]], chosen: set[str], images: Path) -> list[str]:
    """Real defect rows to include: overflow titles, ids without image, rows with empty cells."""
    types = {r["articleType"] for r in rows if r["id"] in chosen}
    empty = sorted((r["id"] for r in rows if r["articleType"] in types and (images / f"{r['id']}.jpg").is_file()
                    and any(not v.strip() for v in r.values())), key=_order)[:EMPTY_CELL_ROWS]
    return [*OVERFLOW_IDS, *MISSING_IMAGE_IDS, *empty]


def write_catalog(out: Path, header: list[str], rows: list[dict[str, str]], ids: list[str],
                  splits: dict[str, str], raw: dict[str, str], source: Path) -> None:
    """Write styles.csv (quoted CSV; overflow rows written back unquoted, as in the source) and images."""
    by_id = {r["id"]: r for r in rows}
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "styles.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([*header, "split"])
        for product_id in ids:
            if product_id in OVERFLOW_IDS:
                handle.write(f"{raw[product_id]},{splits[product_id]}\n")
            else:
                writer.writerow([*(by_id[product_id][c] for c in header), splits[product_id]])
            image = source / "images" / f"{product_id}.jpg"
            if image.is_file():
                shutil.copyfile(image, out / "images" / image.name)


def write_notice(out: Path, ids: list[str], splits: dict[str, str], args: argparse.Namespace,
                 argv: list[str]) -> None:
    """NOTICE: where the data comes from, its licence, what was selected and how, the command."""
    split_counts = Counter(splits[i] for i in ids)
    default_args = "(defaults: --source ../shared/datasets/fashion-product-images-small --out data/mini-catalog)"
    images = len(list((out / "images").glob("*.jpg")))
    (out / "NOTICE").write_text(f"""\
vitrine mini catalog
====================

Source: the Kaggle dataset "Fashion Product Images (Small)" by paramaggarwal
(https://www.kaggle.com/datasets/paramaggarwal/fashion-product-images-small), as mirrored publicly on
GitHub; licence as listed there: MIT. Images are copied byte for byte from the project's copy (whose
EXIF/XMP metadata was stripped losslessly with `jpegtran -copy none -optimize`; pixels unchanged).

Selection (deterministic, no randomness): among rows with an image and no empty cell, the {args.types}
most common articleTypes; per type, ids ordered by SHA-1 of the id, {args.test_per_type} from the `test`
split and {args.per_type - args.test_per_type} from the `train` split
(splits.csv: bucket = int(sha1(id), 16) % 100; test 0-9, val 10-14, train the rest).
Added on purpose, real defect rows of the source: {', '.join(OVERFLOW_IDS)} (titles with unquoted commas,
written back unquoted so ingest must repair them), {', '.join(MISSING_IMAGE_IDS)} (ids with no image
file) and {EMPTY_CELL_ROWS} rows with empty cells.

styles.csv: the source columns plus `split` (from splits.csv). {len(ids)} rows, {images} images,
splits: {dict(sorted(split_counts.items()))}.

Made with: python scripts/make_mini_catalog.py {' '.join(argv) or default_args}
""", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Build the mini catalog from the source dataset folder into the output folder (replacing it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="fashion-product-images-small folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (replaced)")
    parser.add_argument("--types", type=int, default=20, help="number of article types (most common first)")
    parser.add_argument("--per-type", type=int, default=50, help="products per article type")
    parser.add_argument("--test-per-type", type=int, default=10, help="of which from the test split")
    args = parser.parse_args(argv)
    header, rows, splits, raw = load_source(args.source)
    chosen = select_ids(rows, splits, args.source / "images", args.types, args.per_type, args.test_per_type)
    ids = chosen + [i for i in defect_ids(rows, set(chosen), args.source / "images") if i not in chosen]
    if args.out.exists():
        shutil.rmtree(args.out)
    write_catalog(args.out, header, rows, ids, splits, raw, args.source)
    write_notice(args.out, ids, splits, args, sys.argv[1:] if argv is None else list(argv))
    print(f"wrote {len(ids)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
