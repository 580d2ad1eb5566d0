"""read_catalog on the real mini catalog (its real defects) and a config with another column mapping."""

from __future__ import annotations

import codecs
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from model.catalog import CatalogConfig, Product, load_catalog_config, read_catalog

MINI = Path(__file__).resolve().parents[1] / "data" / "mini-catalog"


def test_mini_catalog_defects_are_repaired_and_counted() -> None:
    table = read_catalog(MINI / "styles.csv", CatalogConfig(), images_dir=MINI / "images")
    report = table.report
    assert report["rows_read"] == len(table.products) == report["rows_ok"]
    assert report["rows_repaired_overflow"] >= 2
    assert report["missing_images"] >= 1
    assert sum(v for k, v in report.items() if k.startswith("empty_cells/")) >= 1
    assert report["rows_bad"] == 0 and report["duplicate_ids"] == 0
    by_id = {p.product_id: p for p in table.products}
    assert by_id["3413"].title == "Myntra Men's Yes, its all about me White T-shirt"
    assert by_id["23127"].title == "Converse Unisex Green Live, Life, Laugh Flip Flops"
    assert by_id["23127"].split == "train" and by_id["4854"].split == "test"
    assert len({p.category for p in table.products}) >= 20
    assert sum(p.split == "test" for p in table.products) >= 150


def test_product_json_round_trip() -> None:
    product = read_catalog(MINI / "styles.csv", CatalogConfig()).products[0]
    assert Product.from_json(json.loads(json.dumps(product.to_json()))) == product


def _other_catalog(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A tiny CSV with different column names (+ defects) and real images copied from the mini catalog."""
    images = tmp_path / "pics"
    images.mkdir()
    ids = sorted(p.stem for p in (MINI / "images").glob("*.jpg"))[:4]
    for product_id in ids:
        shutil.copyfile(MINI / "images" / f"{product_id}.jpg", images / f"sku-{product_id}.jpeg")
    lines = ["sku;name;kind;maker;cost;qty;colour",
             f"{ids[0]};Red, shiny shoe;Shoes;Acme;12.50;3;Red",
             f"{ids[1]};Blue bag;Bags;;not-a-price;0;",
             f"{ids[2]};Green hat;Hats;Hatco;;;Green",
             f"{ids[2]};Duplicate hat;Hats;Hatco;1;1;Green",
             f"{ids[3]};Short row",
             ";No id;Hats;X;1;1;Blue"]
    csv_path = tmp_path / "catalog.csv"
    csv_path.write_text("\n".join(line.replace(";", ",") for line in lines) + "\n", encoding="utf-8")
    return csv_path, images, ids


def test_config_from_json_with_another_column_mapping(tmp_path: Path) -> None:
    csv_path, images, ids = _other_catalog(tmp_path)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({
        "id_column": "sku", "image_pattern": "sku-{id}.jpeg", "title_column": "name", "category_column": "kind",
        "brand_column": "maker", "price_column": "cost", "currency": "EUR", "stock_column": "qty",
        "image_url_pattern": "https://cdn.example.com/{id}.jpg", "attribute_columns": ["colour"],
        "split_column": None, "overflow_column": "name"}), encoding="utf-8")
    config = load_catalog_config(config_path)
    assert config.attribute_columns == ("colour",)
    table = read_catalog(csv_path, config, images_dir=images)
    first, second, third = table.products
    assert first.title == "Red, shiny shoe" and first.price == 12.5 and first.in_stock and first.currency == "EUR"
    assert first.image_url == f"https://cdn.example.com/{ids[0]}.jpg" and first.split is None
    assert second.price is None and not second.in_stock and second.brand == ""
    assert third.in_stock and third.attributes == {"colour": "Green"}
    report = table.report
    assert report["rows_read"] == 6 and report["rows_ok"] == 3
    assert report["rows_repaired_overflow"] == 1 and report["bad_price"] == 1 and report["duplicate_ids"] == 1
    assert report["rows_bad/too_few_fields"] == 1 and report["rows_bad/missing_id"] == 1
    assert report["rows_bad"] == 2 and report["missing_images"] == 0
    assert report["empty_cells/maker"] == 1


def test_config_errors_say_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"id_colum": "sku"}), encoding="utf-8")
    with pytest.raises(ValueError, match="id_colum"):
        load_catalog_config(bad)
    with pytest.raises(ValueError, match="lacks the configured columns"):
        read_catalog(MINI / "styles.csv", CatalogConfig(title_column="name"))


SHOP = CatalogConfig(id_column="sku", title_column="name", category_column="type", price_column="price",
                     attribute_columns=("type",), split_column=None, overflow_column="name")


def test_spreadsheet_exports_semicolons_tabs_and_windows_1252(tmp_path: Path) -> None:
    """A European Excel export (';' and Windows-1252, a decimal comma needs quoting there), a TSV, a UTF-8 BOM."""
    (tmp_path / "eu.csv").write_bytes("sku;name;type;price\r\n1;Caf\u00e9 cr\u00e8me shirt;Shirts;19.90\r\n"
                                      "2;Blue jeans; slim;Jeans;49\r\n".encode("cp1252"))
    table = read_catalog(tmp_path / "eu.csv", SHOP)
    assert [p.title for p in table.products] == ["Caf\u00e9 cr\u00e8me shirt", "Blue jeans; slim"]  # repaired
    assert table.products[0].price == 19.9 and table.report["rows_repaired_overflow"] == 1
    (tmp_path / "shop.tsv").write_text("\ufeffsku\tname\ttype\tprice\n7\tT\u00e9e, red\tTshirts\t5\n", encoding="utf-8")
    product = read_catalog(tmp_path / "shop.tsv", SHOP).products[0]
    assert (product.product_id, product.title, product.category) == ("7", "T\u00e9e, red", "Tshirts")
    # a delimiter given in the config wins over detection
    (tmp_path / "pipe.csv").write_text("sku|name|type|price\n8|a,b;c|Tops|1\n", encoding="utf-8")
    config = CatalogConfig(**{**SHOP.__dict__, "delimiter": "|"})
    assert read_catalog(tmp_path / "pipe.csv", config).products[0].title == "a,b;c"


def test_a_utf8_export_with_a_few_windows_1252_bytes_keeps_its_utf8(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """One cell pasted from a Windows program into a UTF-8 export: the file was read wholly as Windows-1252, so
    every other accented title became mojibake ("CafÃ©"). Now only the bytes that are not UTF-8 are."""
    data = ("sku,name,type,price\n1,Caf\u00e9 \u00e0 la cr\u00e8me,Shirts,1\n".encode("utf-8")
            + "2,Cr\u00e8me \u2013 \u00e9t\u00e9,Shirts,2\n".encode("cp1252")
            + "3,\u00c9t\u00e9 \u201ctee\u201d \u20ac,Shirts,3\n".encode("utf-8"))
    (tmp_path / "mixed.csv").write_bytes(data)
    with caplog.at_level("WARNING", logger="vitrine.catalog"):
        table = read_catalog(tmp_path / "mixed.csv", SHOP)
    assert [p.title for p in table.products] == ["Caf\u00e9 \u00e0 la cr\u00e8me", "Cr\u00e8me \u2013 \u00e9t\u00e9",
                                                 "\u00c9t\u00e9 \u201ctee\u201d \u20ac"]
    assert "UTF-8 but for 4 bytes" in caplog.text
    bom_then_cp1252 = codecs.BOM_UTF8 + "sku,name,type,price\n1,Cr\u00e8me,Shirts,1\n".encode("cp1252")
    (tmp_path / "bom.csv").write_bytes(bom_then_cp1252)
    assert read_catalog(tmp_path / "bom.csv", SHOP).products[0].title == "Cr\u00e8me"  # a BOM, then Windows-1252


def test_wrong_encoding_or_delimiter_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "eu.csv").write_bytes("sku;name;type;price\n1;Caf\u00e9;Shirts;1\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"is not valid utf-8 .* set \"encoding\""):
        read_catalog(tmp_path / "eu.csv", CatalogConfig(**{**SHOP.__dict__, "encoding": "utf-8"}))
    (tmp_path / "odd.csv").write_text("sku:name:type:price\n1:a:b:1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lacks the configured columns"):
        read_catalog(tmp_path / "odd.csv", SHOP)
    with pytest.raises(ValueError, match=r"read as one column: set \"delimiter\""):
        read_catalog(tmp_path / "eu.csv", CatalogConfig(**{**SHOP.__dict__, "id_column": "id", "encoding": "cp1252"}))


@pytest.mark.parametrize("cell, price", [
    ("19.90", 19.9), ("19,90", 19.9), ("$1,299.00", 1299.0), ("1.299,00 €", 1299.0), ("1,299", 1299.0),
    ("1.299", 1299.0), ("EUR 5", 5.0), ("0,5", 0.5), ("1 299,00", 1299.0), ("1\u00a0299,99", 1299.99),
    ("0.299", 0.299), ("12,345,678", 12345678.0), ("1.234.567,89", 1234567.89), ("19.9 USD", 19.9),
    ("CHF 1'299.50", 1299.5), (".5", 0.5), ("", None), ("  ", None)])
def test_prices_as_shops_write_them(cell: str, price: float | None) -> None:
    from model.catalog import parse_price

    assert parse_price(cell) == price


@pytest.mark.parametrize("cell", ["abc", "-5", "19.90.1", "1,2,3", "nan", "inf", "12..5", "$"])
def test_what_is_not_a_price(cell: str) -> None:
    from model.catalog import parse_price

    with pytest.raises(ValueError):
        parse_price(cell)


def test_decimal_comma_catalog_and_a_configured_separator(tmp_path: Path) -> None:
    (tmp_path / "eu.csv").write_text("sku;name;type;price\n1;a;Shirts;19,90 \u20ac\n2;b;Shirts;1.299,00\n"
                                     "3;c;Shirts;1,299\n4;d;Shirts;gratis\n", encoding="utf-8")
    table = read_catalog(tmp_path / "eu.csv", SHOP)
    assert [p.price for p in table.products] == [19.9, 1299.0, 1299.0, None] and table.report["bad_price"] == 1
    config = CatalogConfig(**{**SHOP.__dict__, "decimal_separator": ","})  # three decimals: say so
    assert [p.price for p in read_catalog(tmp_path / "eu.csv", config).products][:3] == [19.9, 1299.0, 1.299]


def test_stock_words_of_common_exports(tmp_path: Path) -> None:
    config = CatalogConfig(**{**SHOP.__dict__, "stock_column": "stock"})
    cells = ["in_stock", "out_of_stock", "instock", "outofstock", "In Stock", "Sold out", "preorder", "3", "0", "",
             "yes", "no", "maybe later"]
    rows = "".join(f"{i},p{i},Shirts,1,{cell}\n" for i, cell in enumerate(cells))
    (tmp_path / "stock.csv").write_text("sku,name,type,price,stock\n" + rows, encoding="utf-8")
    table = read_catalog(tmp_path / "stock.csv", config)
    assert [p.in_stock for p in table.products] == [True, False, True, False, True, False, False, True, False,
                                                     True, True, False, False]
    assert table.report["stock_unrecognised/maybe later"] == 1
    assert not any(k.startswith("stock_unrecognised/") and k != "stock_unrecognised/maybe later"
                   for k in table.report)


def test_a_negative_stock_quantity_is_out_of_stock(tmp_path: Path) -> None:
    """Inventory exports write oversold items as negative quantities: -3 must not read as 3 in stock."""
    config = CatalogConfig(**{**SHOP.__dict__, "stock_column": "stock"})
    cells = ["-3", "-1", "\u22122", "2", "0", "-0", "1.5", "nan", "1 234", "- 5"]
    rows = "".join(f"{i},p{i},Shirts,1,{cell}\n" for i, cell in enumerate(cells))
    (tmp_path / "stock.csv").write_text("sku,name,type,price,stock\n" + rows, encoding="utf-8")
    table = read_catalog(tmp_path / "stock.csv", config)
    assert [p.in_stock for p in table.products] == [False, False, False, True, False, False, True, False, True,
                                                     False]


def test_a_trailing_delimiter_on_data_rows_does_not_shift_the_columns(tmp_path: Path) -> None:
    """Rows written as "a,b,c," under a header "a,b,c": the empty last field is dropped, not joined into the
    overflow column (which would shift every later column: category into brand, price into stock)."""
    config = CatalogConfig(**{**SHOP.__dict__, "stock_column": "stock"})
    (tmp_path / "trail.csv").write_text("sku,name,type,price,stock\n1,Shirt A,Shirts,5,yes,\n"
                                        "2,Shirt, B,Shirts,7,no\n3,C,Shirts,9,3,,\n", encoding="utf-8")
    table = read_catalog(tmp_path / "trail.csv", config)
    assert [(p.title, p.category, p.price, p.in_stock) for p in table.products] == [
        ("Shirt A", "Shirts", 5.0, True), ("Shirt, B", "Shirts", 7.0, False), ("C", "Shirts", 9.0, True)]
    assert table.report["rows_repaired_trailing_delimiter"] == 2 and table.report["rows_repaired_overflow"] == 1
    assert table.report["bad_price"] == 0


def test_a_long_cell_is_read_and_a_csv_error_names_the_line(tmp_path: Path) -> None:
    """A 200 KB description (an HTML body of a shop export) is more than Python's csv default limit of 128 KiB;
    what the csv module still refuses is a ValueError with the file and line, not a traceback."""
    long = "x" * 200_000
    (tmp_path / "long.csv").write_text(f'sku,name,type,price\n1,"{long}",Shirts,1\n2,b,Shirts,1\n', encoding="utf-8")
    table = read_catalog(tmp_path / "long.csv", SHOP)
    assert [len(p.title) for p in table.products] == [200_000, 1]
    (tmp_path / "huge.csv").write_text('sku,name,type,price\n1,a,Shirts,1\n2,"' + "y" * (17 << 20) + '",Shirts,1\n',
                                       encoding="utf-8")
    with pytest.raises(ValueError, match=r"huge.csv, line \d+: field larger than field limit"):
        read_catalog(tmp_path / "huge.csv", SHOP)


@pytest.mark.parametrize("pattern", ["{sku}.jpg", "{id:05d}.jpg", "{0}.jpg", "{id.jpg", "{id}}.jpg"])
def test_an_image_pattern_with_another_placeholder_is_a_config_error(pattern: str) -> None:
    """"{sku}.jpg" (the user's column name instead of {id}) raised KeyError deep in ingest, a traceback."""
    with pytest.raises(ValueError, match=r"image_pattern .* its only placeholder is \{id\}"):
        CatalogConfig.from_json({"id_column": "sku", "image_pattern": pattern})
    with pytest.raises(ValueError, match=r"image_url_pattern .* its only placeholder is \{id\}"):
        CatalogConfig(image_url_pattern="https://cdn.example.com/" + pattern)
    literal = CatalogConfig(image_pattern="photos/{id}_{{front}}.jpg")
    assert literal.image_pattern.format(id="7") == "photos/7_{front}.jpg"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_excel_unicode_text_export_is_read(tmp_path: Path, encoding: str) -> None:
    """Excel's "Unicode Text" export is UTF-16 with a byte order mark, tab-separated; it was read as Windows-1252
    (a header of NUL-separated letters)."""
    text = "sku\tname\ttype\tprice\n1\tCaf\u00e9 cr\u00e8me \u4e2d\u6587 \U0001f457\tShirts\t19,90 \u20ac\n"
    data = text.encode(encoding)
    if encoding != "utf-16":  # the plain codec writes its BOM itself
        data = (codecs.BOM_UTF16_LE if encoding.endswith("le") else codecs.BOM_UTF16_BE) + data
    (tmp_path / "unicode.txt").write_bytes(data)
    table = read_catalog(tmp_path / "unicode.txt", SHOP)
    assert [(p.product_id, p.title, p.price) for p in table.products] == [
        ("1", "Caf\u00e9 cr\u00e8me \u4e2d\u6587 \U0001f457", 19.9)]


def test_an_unclosed_quote_that_swallows_rows_is_counted_and_named(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """`2,"12 inch pizza,...` opens a quote that the csv module closes only at the next quote in the file: the
    rows between became part of one title, without a count or a word. A legitimate multi-line cell is not
    suspected."""
    (tmp_path / "quote.csv").write_text(
        'sku,name,type,price\n1,a,Shirts,1\n2,"12 inch pizza,Shirts,2\n3,c,Shirts,3\n4,d,Shirts,4\n'
        '5,e "big",Shirts,5\n6,"two\nlines, fine",Shirts,6\n', encoding="utf-8")
    with caplog.at_level("WARNING", logger="vitrine.catalog"):
        table = read_catalog(tmp_path / "quote.csv", SHOP)
    assert table.report["rows_suspect_unclosed_quote"] == 1
    assert "quote.csv, lines 3-6 were read as one row" in caplog.text and "line 3 is probably not closed" in caplog.text
    assert table.products[-1].title == "two\nlines, fine"


def test_a_product_id_too_long_for_the_index_is_a_bad_row(tmp_path: Path) -> None:
    """An id over LMDB's key size (a product URL mapped as the id) passed ingest and the whole embed stage, then
    stopped the index build with lmdb.BadValsizeError; it is now a bad row, counted at once."""
    long_id = "https://shop.example.com/products/" + "very-long-handle-" * 40
    accents = "\u00e9" * 250
    (tmp_path / "ids.csv").write_text(f"sku,name,type,price\n{long_id},a,Shirts,1\n{accents},b,Shirts,1\n"
                                      "ok,c,Shirts,1\n", encoding="utf-8")
    table = read_catalog(tmp_path / "ids.csv", SHOP)
    assert [p.product_id for p in table.products] == [accents, "ok"]  # 500 bytes: the limit
    assert table.report["rows_bad/id_too_long"] == 1 and table.report["rows_bad"] == 1


@pytest.mark.parametrize("field, value, message", [
    ("delimiter", ";;", "delimiter must be one character"),  # was TypeError from the csv module
    ("encoding", "utf-99", "encoding 'utf-99' is not an encoding Python knows"),  # was LookupError
    ("attribute_columns", "type", "attribute_columns must be a list of column names"),  # was ['e', 'p', 't', 'y']
    ("id_column", 5, "id_column must be a column name, got 5"),
    ("title_column", None, "title_column must be a column name, got None"),
    ("decimal_separator", "x", "decimal_separator must be"),
])
def test_config_values_of_the_wrong_type_are_named(tmp_path: Path, field: str, value: object, message: str) -> None:
    (tmp_path / "columns.json").write_text(json.dumps({**SHOP.to_json(), field: value}), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_catalog_config(tmp_path / "columns.json")


def test_config_attribute_columns_null_means_none() -> None:
    assert CatalogConfig.from_json({**SHOP.to_json(), "attribute_columns": None}).attribute_columns == ()


def test_excel_sep_line_names_the_delimiter(tmp_path: Path) -> None:
    """Excel writes "sep=;" before the header of a CSV meant for it: the header was read as ['sep=;'] (and with
    "delimiter": ";" set as the error suggested, every row was bad and the catalog silently empty)."""
    (tmp_path / "excel.csv").write_bytes(b'\xef\xbb\xbfsep=;\r\nsku;name;type;price\r\n1;a, b;Shirts;1,5\r\n')
    for config in (SHOP, CatalogConfig(**{**SHOP.__dict__, "delimiter": ";"})):
        table = read_catalog(tmp_path / "excel.csv", config)
        assert [(p.product_id, p.title, p.price) for p in table.products] == [("1", "a, b", 1.5)]


def test_the_column_mapping_is_checked_even_when_every_row_is_bad(tmp_path: Path) -> None:
    """The header was checked against the mapping only at the first good row: a CSV whose rows all had the wrong
    field count (a wrong delimiter) or a header-only export gave an empty catalog and no error."""
    (tmp_path / "bad.csv").write_text("sku,name\n1;a;Shirts;1\n", encoding="utf-8")
    (tmp_path / "header.csv").write_text("sku,nom,type\n", encoding="utf-8")
    for name in ("bad.csv", "header.csv"):
        with pytest.raises(ValueError, match="lacks the configured columns"):
            read_catalog(tmp_path / name, SHOP)


def test_a_header_naming_a_mapped_column_twice_is_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two columns of one name: each row kept the last one's value, silently. A mapped one is an error; another
    is a warning."""
    path = tmp_path / "dup.csv"
    config = CatalogConfig(id_column="id", title_column="title", category_column="type", attribute_columns=(),
                           split_column=None)
    path.write_text("id,title,type,title,notes,notes\n1,Red shirt,Shirts,Blue shirt,a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"more than one column named \['title'\]"):
        read_catalog(path, config)
    path.write_text("id,title,type,notes,notes\n1,Red shirt,Shirts,a,b\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="vitrine.catalog"):
        table = read_catalog(path, config)
    assert [p.title for p in table.products] == ["Red shirt"]
    assert any("['notes']" in r.getMessage() for r in caplog.records)


def test_the_default_split_column_is_optional_and_a_split_file_needs_none(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The default mapping required a "split" column, so `vitrine ingest --csv styles.csv` (the --help's typical
    flow, on the catalog in ../shared, whose splits are in a separate splits.csv) failed at the header."""
    header = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName\n"
    (tmp_path / "styles.csv").write_text(header + "7,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,Blue Shirt\n"
                                         "8,Women,Apparel,Topwear,Tops,Red,Fall,2011,Casual,Red Top\n")
    with caplog.at_level(logging.WARNING, logger="vitrine.catalog"):
        table = read_catalog(tmp_path / "styles.csv", CatalogConfig())
    assert [p.split for p in table.products] == [None, None] and "no 'split' column" in caplog.text
    (tmp_path / "splits.csv").write_text("id,split\n7,train\n8,test\n")
    table = read_catalog(tmp_path / "styles.csv", CatalogConfig(split_file="splits.csv"))  # column left at default
    assert [p.split for p in table.products] == ["train", "test"]
    with pytest.raises(ValueError, match=r"lacks the configured columns \['fold'\]"):  # a named one stays required
        read_catalog(tmp_path / "styles.csv", CatalogConfig(split_column="fold"))
