"""Catalog CSV reading: the column mapping (CatalogConfig), the shared Product record and a robust reader.

Real catalogs are messy (unquoted commas in titles, empty cells, bad prices, duplicate ids), so the reader
repairs what it can, counts everything it repairs or drops, and never drops a row silently.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("vitrine.catalog")
# availability words of common exports (Google Merchant in_stock/out_of_stock, WooCommerce instock/outofstock,
# plain yes/no); compared after lower-casing with "-", "_" and spaces removed
_TRUE_STOCK = {"true", "yes", "y", "t", "on", "instock", "available", "availablefororder"}
_FALSE_STOCK = {"false", "no", "n", "f", "off", "outofstock", "soldout", "unavailable", "discontinued",
                "preorder", "backorder", "onbackorder"}


DEFAULT_SPLIT_COLUMN = "split"


@dataclass(frozen=True)
class CatalogConfig:
    """How to read one catalog CSV: which column holds what (defaults fit fashion-product-images-small)."""

    id_column: str = "id"
    image_pattern: str = "{id}.jpg"  # relative to the images folder
    image_column: str | None = None  # a column naming each image: a path (absolute, or in the images folder) or an
    # http(s) URL (downloaded at ingest); wins over image_pattern. None: image_pattern
    title_column: str = "productDisplayName"
    category_column: str = "articleType"
    brand_column: str | None = None  # None: empty brand
    price_column: str | None = None  # None: price unknown
    currency: str = ""
    stock_column: str | None = None  # None: every product in stock
    image_url_pattern: str | None = None  # e.g. "https://cdn.example.com/{id}.jpg"; None: empty URL
    attribute_columns: tuple[str, ...] = (
        "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year", "usage")
    split_column: str | None = DEFAULT_SPLIT_COLUMN  # None: no split; the default may be absent
    split_file: str | None = None  # an "id,split" CSV (path relative to the catalog CSV's folder); wins over the column
    overflow_column: str | None = "productDisplayName"  # extra fields of a too-long row are joined back here
    delimiter: str | None = None  # None: the one of , ; tab | that finds id_column in the header (else ",")
    decimal_separator: str | None = None  # of prices; None: detected per cell (model.catalog.parse_price)
    encoding: str | None = None  # None: UTF-8 (BOM or not), or Windows-1252 when the file is not valid UTF-8

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("image_pattern", "image_url_pattern"):
            pattern = getattr(self, name)
            if pattern is None:
                continue
            try:
                pattern.format(id="1")
            except (KeyError, IndexError, ValueError, AttributeError) as exc:
                raise ValueError(f"catalog config {name} {pattern!r} cannot be filled in ({type(exc).__name__}: "
                                 f"{exc}): its only placeholder is {{id}}, the product id as text (e.g. "
                                 "\"{id}.jpg\"); write a literal brace as {{ or }}") from None

    def _check_types(self) -> None:
        """ValueError naming the field when a value has the wrong type or form (a config file's typo surfaced as a
        TypeError / LookupError traceback in the CSV reader, or as columns named by single letters)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "attribute_columns":
                if not isinstance(value, tuple) or not all(isinstance(c, str) for c in value):
                    raise ValueError(f"catalog config attribute_columns must be a list of column names (e.g. "
                                     f"[\"type\"]), got {value!r}")
            elif not isinstance(value, str) and not (value is None and "None" in str(f.type)):
                raise ValueError(f"catalog config {f.name} must be {'a column name' if 'column' in f.name else 'text'}"
                                 f"{' or null' if 'None' in str(f.type) else ''}, got {value!r}")
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise ValueError(f"catalog config delimiter must be one character (\",\" \";\" \"\\t\" \"|\"), got "
                             f"{self.delimiter!r}")
        if self.decimal_separator not in (None, ".", ","):
            raise ValueError(f"catalog config decimal_separator must be \".\" or \",\" (or null: detected), got "
                             f"{self.decimal_separator!r}")
        if self.encoding is not None:
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ValueError(f"catalog config encoding {self.encoding!r} is not an encoding Python knows (e.g. "
                                 "\"utf-8\", \"cp1252\", \"latin-1\", \"utf-16\")") from None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CatalogConfig:
        """Config from a dict; unknown keys raise so that typos in a config file are caught."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown catalog config keys {unknown}; known keys: {sorted(known)}")
        values = dict(data)
        columns = values.get("attribute_columns", ())
        if isinstance(columns, list):
            values["attribute_columns"] = tuple(columns)
        elif columns is None:
            values["attribute_columns"] = ()
        return cls(**values)


def load_catalog_config(path: str | Path) -> CatalogConfig:
    """Read a CatalogConfig from a JSON file (any subset of the fields; the rest keep their defaults)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"catalog config {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"catalog config {path} must hold a JSON object, got {type(data).__name__}")
    return CatalogConfig.from_json(data)


@dataclass(frozen=True)
class Product:
    """The metadata of one catalog product, shared by every room (ingest, index, engine, client)."""

    product_id: str
    title: str
    category: str
    brand: str
    price: float | None
    currency: str
    in_stock: bool
    image_url: str
    attributes: dict[str, str]
    split: str | None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; `Product.from_json` inverts it.

        Every field is a str, number, bool or None but `attributes`, which is copied, so this is
        `dataclasses.asdict` without its recursive deep copy (5x faster: the embed stage calls it per image).
        """
        data = {name: getattr(self, name) for name in _PRODUCT_FIELDS}
        data["attributes"] = dict(self.attributes)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Product:
        """Product from a `to_json` dict."""
        price = data.get("price")
        return cls(product_id=str(data["product_id"]), title=data.get("title", ""),
                   category=data.get("category", ""), brand=data.get("brand", ""),
                   price=None if price is None else float(price), currency=data.get("currency", ""),
                   in_stock=bool(data.get("in_stock", True)), image_url=data.get("image_url", ""),
                   attributes={str(k): str(v) for k, v in (data.get("attributes") or {}).items()},
                   split=data.get("split"))


_PRODUCT_FIELDS = tuple(f.name for f in dataclasses.fields(Product))


@dataclass
class CatalogTable:
    """The products read from a catalog CSV plus the counts of everything repaired, empty or dropped."""

    products: list[Product]
    report: dict[str, int] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)  # each product's image source: a relative or absolute path, or
    # an http(s) URL (resolve_source below places a path in the images folder); "" when the row names none


DELIMITERS = (",", ";", "\t", "|")
MAX_ID_BYTES = 500  # a product id's UTF-8 length: the index's catalog store keys it in LMDB (at most 511 bytes)


MIXED_ENCODING = "utf-8+cp1252"  # csv_encoding's answer for a UTF-8 file with a few Windows-1252 bytes in it
_CP1252_FALLBACK = "vitrine-cp1252-fallback"


def _cp1252_fallback(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: bytes that are not UTF-8 are decoded one by one as Windows-1252 (its five undefined
    bytes as U+FFFD)."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return bytes(exc.object[exc.start:exc.end]).decode("cp1252", errors="replace"), exc.end


codecs.register_error(_CP1252_FALLBACK, _cp1252_fallback)
_UNDECODED = re.compile("[\udc80-\udcff]")  # surrogateescape's stand-ins for bytes that are not UTF-8
_NON_ASCII = re.compile("[^\x00-\x7f\udc80-\udcff]")


def csv_encoding(csv_path: str | Path, encoding: str | None) -> str:
    """The encoding to read `csv_path` with: `encoding`, else UTF-16 when the file starts with its byte order mark
    (Excel's "Unicode Text" export), else UTF-8 (with or without a BOM) when the whole file decodes as UTF-8, else
    Windows-1252 (what spreadsheet programs on Windows export) when no non-ASCII text in it is UTF-8, else
    MIXED_ENCODING: UTF-8 with the bytes that are not UTF-8 read as Windows-1252 (a UTF-8 export with a few cells
    pasted from a Windows program; read wholly as Windows-1252 every accented letter of it became two, "Ã©").
    Both fallbacks log a warning."""
    if encoding is not None:
        return encoding
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    undecoded = utf8_letters = 0
    with open(csv_path, "rb") as handle:
        if handle.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):  # Excel's "Unicode Text" export
            return "utf-16"
        handle.seek(0)
        while chunk := handle.read(1 << 20):
            text = decoder.decode(chunk)
            undecoded += len(_UNDECODED.findall(text))
            utf8_letters += len(_NON_ASCII.findall(text))
        undecoded += len(_UNDECODED.findall(decoder.decode(b"", final=True)))
    if not undecoded:
        return "utf-8-sig"
    if not utf8_letters:  # (a UTF-8 byte order mark counts as UTF-8: a BOM, then Windows-1252 bytes, is mixed)
        logger.warning("catalog CSV %s is not UTF-8 (%d bytes are not): reading it as Windows-1252; set "
                       "\"encoding\" in the catalog config to choose another", csv_path, undecoded)
        return "cp1252"
    logger.warning("catalog CSV %s is UTF-8 but for %d bytes that are not (pasted from a Windows program?): reading "
                   "those as Windows-1252 and the rest as UTF-8; set \"encoding\" in the catalog config to choose "
                   "one encoding for the whole file", csv_path, undecoded)
    return MIXED_ENCODING


def csv_delimiter(first_line: str, delimiter: str | None, id_column: str | None) -> str:
    """`delimiter`, else the first of , ; tab | whose split of the header holds `id_column`, else ","."""
    if delimiter is not None:
        return delimiter
    for candidate in DELIMITERS:
        fields = next(csv.reader([first_line], delimiter=candidate), [])
        if id_column is not None and id_column in [f.strip() for f in fields]:
            return candidate
    return ","


def iter_csv_rows(csv_path: str | Path, overflow_column: str | None, report: Counter[str], *,
                  delimiter: str | None = ",", encoding: str | None = "utf-8-sig", id_column: str | None = None,
                  on_header: Callable[[list[str]], None] | None = None) -> Iterator[tuple[list[str], dict[str, str]]]:
    """Yield (header, row dict) for each data row, repairing rows that have too many fields.

    A row with more fields than the header only because it ends with delimiters ("a;b;c;") loses the empty
    extra fields. Another row with more fields than the header (an unquoted delimiter) has its extra fields
    joined back into `overflow_column` with the delimiter; a row with too few fields (or too many and no overflow
    column) is counted as bad and skipped. Blank lines are counted, and so is (with a warning naming its lines) a
    row whose multi-line field holds what looks like whole rows: an unclosed quote (rows_suspect_unclosed_quote).
    `delimiter` / `encoding` None: detected (csv_delimiter with `id_column`, csv_encoding); an Excel "sep=;" first
    line names the delimiter and is skipped. `on_header` is called with the header before the first row (even when
    no row follows, or every row is bad).
    """
    chosen = csv_encoding(csv_path, encoding)
    try:
        yield from _iter_rows(csv_path, overflow_column, report, delimiter, chosen, id_column, on_header)
    except UnicodeDecodeError as exc:  # only with an `encoding` the caller chose (detection checked UTF-8)
        raise ValueError(f"catalog CSV {csv_path} is not valid {chosen} ({exc.reason} at byte {exc.start}); set "
                         "\"encoding\" in the catalog config to the file's encoding, e.g. \"cp1252\" or "
                         "\"latin-1\"") from exc


_EXCEL_SEP = re.compile(r'^"?sep=(.)"?\r?\n?$')  # Excel's "sep=;" line before the header


def _iter_rows(csv_path: str | Path, overflow_column: str | None, report: Counter[str], delimiter: str | None,
               encoding: str, id_column: str | None, on_header: Callable[[list[str]], None] | None = None
               ) -> Iterator[tuple[list[str], dict[str, str]]]:
    # the Windows-1252 fallback leaves its five undefined bytes as U+FFFD instead of failing
    errors = {"cp1252": "replace", MIXED_ENCODING: _CP1252_FALLBACK}.get(encoding, "strict")
    with open(csv_path, newline="", encoding="utf-8-sig" if encoding == MIXED_ENCODING else encoding,
              errors=errors) as handle:
        first = handle.readline()
        start = 0
        if sep := _EXCEL_SEP.match(first):
            delimiter, start = delimiter or sep.group(1), handle.tell()
            first = handle.readline()
        delimiter = csv_delimiter(first, delimiter, id_column)
        handle.seek(start)
        if delimiter != ",":
            logger.info("catalog CSV %s: fields separated by %r", csv_path, delimiter)
        raw = csv.reader(handle, delimiter=delimiter)
        reader = _checked(raw, csv_path)
        header = next(reader, None)
        if not header:
            raise ValueError(f"catalog CSV {csv_path} is empty: expected a header row")
        header = [h.strip() for h in header]
        if on_header is not None:
            on_header(header)
        overflow_at = header.index(overflow_column) if overflow_column in header else None
        last_line = raw.line_num
        for fields in reader:
            first_line, last_line = last_line + 1, raw.line_num
            if not fields or all(not f.strip() for f in fields):
                report["blank_lines"] += 1
                continue
            report["rows_read"] += 1
            if last_line > first_line and _holds_rows(fields, delimiter, len(header)):
                report["rows_suspect_unclosed_quote"] += 1
                if report["rows_suspect_unclosed_quote"] <= 20:
                    logger.warning("catalog CSV %s, lines %d-%d were read as one row: a field holds lines that look "
                                   "like rows of their own, so a quote opened on line %d is probably not closed "
                                   "(those rows are not read); quote the field, or double the quote inside it",
                                   csv_path, first_line, last_line, first_line)
            extra = len(fields) - len(header)
            if extra > 0 and not any(f.strip() for f in fields[len(header):]):
                fields = fields[:len(header)]  # a delimiter ending the line ("a;b;c;"): no value was split
                report["rows_repaired_trailing_delimiter"] += 1
            elif extra > 0 and overflow_at is not None:
                joined = delimiter.join(fields[overflow_at:overflow_at + extra + 1])
                fields = fields[:overflow_at] + [joined] + fields[overflow_at + extra + 1:]
                report["rows_repaired_overflow"] += 1
            elif extra != 0:
                reason = "too_many_fields" if extra > 0 else "too_few_fields"
                report["rows_bad"] += 1
                report[f"rows_bad/{reason}"] += 1
                continue
            yield header, dict(zip(header, fields, strict=True))


def _holds_rows(fields: list[str], delimiter: str, columns: int) -> bool:
    """True when a field spanning lines holds a line with a whole row's delimiters (`columns` - 1 of them): the
    sign of a quote that was opened and not closed, which makes the csv module read on across rows."""
    return columns > 2 and any(line.count(delimiter) >= columns - 1 for field in fields if "\n" in field
                               for line in field.split("\n")[1:])


CSV_FIELD_LIMIT = 16 << 20  # characters in one cell (Python's csv default, 128 KiB, is less than one long
# HTML product description of a shop export)


def _checked(reader: Any, csv_path: str | Path) -> Iterator[list[str]]:
    """The rows of a csv.reader, with its errors raised as ValueError naming the file and line."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ValueError(f"catalog CSV {csv_path}, line {reader.line_num}: {exc}") from exc
        yield row


_PRICE_RE = re.compile(r"^[+]?(?:\d{1,3}(?:[,.' \u00a0\u202f]\d{3})+|\d*)(?:[.,]\d+)?$")


def parse_price(text: str, decimal: str | None = None) -> float | None:
    """A price cell as a float; None when empty; ValueError when it is not a non-negative amount.

    Currency symbols and codes around the number are ignored ("$1,299.00", "19,90 €", "EUR 5"). The
    decimal separator is `decimal` when given, else the last "." or "," when it is followed by one,
    two or four-plus digits, or when both separators appear ("1.299,00"); a lone separator followed by
    exactly three digits ("1,299", "1.299") is read as thousands grouping (set `decimal` when your
    catalog writes prices with three decimals).
    """
    number = re.sub(r"^[^\d+.,-]+|[^\d.,]+$", "", text.strip())  # currency before and after
    if not number:
        if text.strip():
            raise ValueError(f"no number in {text!r}")
        return None
    if not _PRICE_RE.match(number.replace("\u2019", "'")):
        raise ValueError(f"not an amount: {text!r}")
    number = re.sub(r"['\s\u00a0\u202f\u2019]", "", number)
    if decimal is None:
        last = max(number.rfind("."), number.rfind(","))
        both = "." in number and "," in number
        decimals = len(number) - last - 1
        if last >= 0 and (both or decimals != 3 or number.count(number[last]) == 1 and number[:last] in ("0", "")):
            decimal = number[last]
        else:
            decimal = ""  # no decimal part: every separator groups thousands
    whole, separator, fraction = number.rpartition(decimal) if decimal else ("", "", number)
    if not separator:
        whole, fraction = fraction, ""
    value = float(re.sub(r"[.,]", "", whole) + ("." + fraction if fraction else ""))  # "1.2.3" fraction: ValueError
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a non-negative amount: {text!r}")
    return value


def _parse_price(text: str, report: Counter[str], decimal: str | None = None) -> float | None:
    """Price as a float, or None when empty or unparsable (unparsable prices are counted)."""
    try:
        return parse_price(text, decimal)
    except ValueError:
        report["bad_price"] += 1
        return None


def _parse_stock(text: str, report: Counter[str]) -> bool:
    """In stock when the cell is a positive number or an in-stock word; an empty cell means in stock.

    Pre-orders and back-orders are out of stock (not buyable now). Any other word is out of stock and
    counted in the report as stock_unrecognised/<word>, so a mapping that reads a whole catalog as
    sold out does not go unnoticed.
    """
    cell = text.strip()
    if not cell:
        return True
    try:  # a quantity, before "-" is dropped from words: -3 (oversold) is not in stock
        return float(re.sub(r"[\s_]+", "", cell).replace("\u2212", "-")) > 0
    except ValueError:
        pass
    word = re.sub(r"[\s_-]+", "", cell.lower())
    if word in _TRUE_STOCK:
        return True
    if word not in _FALSE_STOCK:
        report[f"stock_unrecognised/{text.strip()[:40]}"] += 1
    return False


def _check_columns(header: list[str], config: CatalogConfig, csv_path: str | Path) -> None:
    """Raise when a column named by the config is not in the CSV header (the mapping is wrong)."""
    wanted = [config.id_column, config.title_column, config.category_column, config.brand_column,
              config.price_column, config.stock_column, config.split_column, config.image_column,
              *config.attribute_columns]
    missing = sorted({c for c in wanted if c is not None and c not in header})
    if config.split_column == DEFAULT_SPLIT_COLUMN and config.split_column in missing and config.split_file is None:
        # the default mapping's split column is optional: most shops' exports have none
        missing.remove(config.split_column)
        logger.warning("catalog CSV %s has no %r column: no product is held out (every product counts as training "
                       "data); set split_column or split_file in the catalog config to hold some out",
                       csv_path, config.split_column)
    if config.split_file is not None and config.split_column in missing:
        missing.remove(config.split_column)  # the split file wins over the column: it need not exist
    if missing:
        hint = ""
        if len(header) == 1 and any(d in header[0] for d in DELIMITERS[1:]):
            hint = " The header was read as one column: set \"delimiter\" in the catalog config (e.g. \";\")."
        raise ValueError(f"catalog CSV {csv_path} lacks the configured columns {missing}; its header is "
                         f"{header}. Fix the column mapping (CatalogConfig / --catalog-config).{hint}")
    repeated = sorted({c for c in header if header.count(c) > 1})
    ambiguous = [c for c in repeated if c in wanted]
    if ambiguous:  # each row's value would silently be the last of the columns of that name
        raise ValueError(f"catalog CSV {csv_path} has more than one column named {ambiguous}, which the column "
                         "mapping reads: rename them in the header so that the mapping names one")
    if repeated:
        logger.warning("catalog CSV %s: more than one column is named %s (not read by the column mapping; only the "
                       "last of each would be kept)", csv_path, repeated)


def _product_from_row(row: dict[str, str], config: CatalogConfig, report: Counter[str], source: str) -> Product:
    """One Product from a repaired row dict (`source`: its image_source)."""
    def cell(column: str | None) -> str:
        return "" if column is None else row.get(column, "").strip()

    product_id = cell(config.id_column)
    split = cell(config.split_column) or None
    if config.image_url_pattern:
        image_url = config.image_url_pattern.format(id=product_id)
    else:  # a URL in the image column is also where shoppers' clients can show the image
        image_url = source if is_url(source) else ""
    return Product(
        product_id=product_id, title=cell(config.title_column), category=cell(config.category_column),
        brand=cell(config.brand_column), price=_parse_price(cell(config.price_column), report,
                                                                config.decimal_separator),
        currency=config.currency, in_stock=_parse_stock(cell(config.stock_column), report), image_url=image_url,
        attributes={c: cell(c) for c in config.attribute_columns}, split=split)


def is_url(source: str) -> bool:
    """True for an http(s) URL (case-insensitive scheme)."""
    return source[:8].lower().startswith(("http://", "https://"))


def resolve_source(source: str, images_dir: Path) -> str:
    """A product's image source as a URL (unchanged), an absolute path, or a path inside `images_dir`."""
    if is_url(source):
        return source
    path = Path(source).expanduser()
    return str(path if path.is_absolute() else images_dir / path)


def image_source(row: dict[str, str], config: CatalogConfig) -> str:
    """Where a row's image is: its image column's path or URL, else image_pattern filled with the id."""
    if config.image_column is not None:
        return row.get(config.image_column, "").strip()
    return config.image_pattern.format(id=row.get(config.id_column, "").strip())


def load_split_file(csv_path: str | Path, split_file: str) -> dict[str, str]:
    """{product id: split} from an "id,split" CSV (path relative to the catalog CSV's folder)."""
    path = Path(split_file)
    path = path if path.is_absolute() else Path(csv_path).parent / path
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} (split_file in the catalog config) does not exist")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows or len(rows[0]) < 2:
        raise ValueError(f"split file {path} must be a CSV with a header and two columns: id,split")
    return {row[0].strip(): row[1].strip() for row in rows[1:] if len(row) >= 2 and row[1].strip()}


def read_catalog(csv_path: str | Path, config: CatalogConfig, *,
                 images_dir: str | Path | None = None) -> CatalogTable:
    """Read a catalog CSV into Products with a report of counts (never drops a row silently).

    Report keys: rows_read, rows_ok, rows_repaired_overflow, rows_bad (+ rows_bad/<reason>: e.g. missing_id,
    id_too_long: over MAX_ID_BYTES), bad_price,
    duplicate_ids (first kept), empty_cells/<column>, blank_lines, empty_image_source (no image named),
    image_urls (images to download) and, when `images_dir` is given, missing_images (products whose image
    file does not exist; they are kept, ingest drops them). `CatalogTable.images` holds each product's
    image source (a path or URL; `resolve_source` places a path in the images folder).
    """
    report: Counter[str] = Counter()
    products: list[Product] = []
    images: list[str] = []
    seen: set[str] = set()
    splits = load_split_file(csv_path, config.split_file) if config.split_file else None
    for _, row in iter_csv_rows(csv_path, config.overflow_column, report, delimiter=config.delimiter,
                                encoding=config.encoding, id_column=config.id_column,
                                on_header=lambda header: _check_columns(header, config, csv_path)):
        for column, value in row.items():
            if not value.strip():
                report[f"empty_cells/{column}"] += 1
        source = image_source(row, config)
        product = _product_from_row(row, config, report, source)
        if splits is not None:
            product = dataclasses.replace(product, split=splits.get(product.product_id))
        if not product.product_id:
            report["rows_bad"] += 1
            report["rows_bad/missing_id"] += 1
            continue
        if len(product.product_id.encode("utf-8")) > MAX_ID_BYTES:
            report["rows_bad"] += 1
            report["rows_bad/id_too_long"] += 1
            if report["rows_bad/id_too_long"] <= 20:
                logger.warning("catalog CSV %s: product id %r... is %d bytes long, over the limit of %d: row skipped "
                               "(is id_column the right column?)", csv_path, product.product_id[:60],
                               len(product.product_id.encode("utf-8")), MAX_ID_BYTES)
            continue
        if product.product_id in seen:
            report["duplicate_ids"] += 1
            continue
        seen.add(product.product_id)
        products.append(product)
        images.append(source)
        if not source:
            report["empty_image_source"] += 1
        elif is_url(source):
            report["image_urls"] += 1
        elif images_dir is not None and not Path(resolve_source(source, Path(images_dir))).is_file():
            report["missing_images"] += 1
    for key in ("rows_read", "rows_repaired_overflow", "rows_bad", "duplicate_ids", "bad_price"):
        report.setdefault(key, 0)
    if images_dir is not None:
        report.setdefault("missing_images", 0)
    report["rows_ok"] = len(products)
    return CatalogTable(products=products, report=dict(sorted(report.items())), images=images)
