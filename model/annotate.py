"""Weak labels from text: the pretraining target (the paper's labels mined from text, at catalog scale).

From the text of each product (its title and any configured attribute columns): normalise (NFKC, lower
case, keep letters and digits), tokenise, drop stop words, count uni- and bi-grams over the catalog and keep
those seen in at least `min_count` products (the vocabulary). Frequent terms (`head_min_count` products or
more) become labels of their own. Long-tail terms are too rare to teach alone, so they are grouped: each is
described by the head terms it co-occurs with (a TF-IDF weighted, L2-normalised co-occurrence profile) and
k-means (scikit-learn) groups similar tail terms into cluster labels. Every image gets a multi-hot set: its
head terms plus the clusters of its tail terms. Deterministic under the seed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.catalog import Product

WEAK_LABELS_FORMAT = "vitrine-weak-labels/1"
_TOKEN = re.compile(r"[a-z0-9]+")
STOP_WORDS = frozenset("""a an and the of for with in on to by at from as or is are be this that it its
    set pack pcs piece pieces combo""".split())


@dataclass(frozen=True)
class WeakLabelConfig:
    """How text becomes weak labels."""

    text_fields: tuple[str, ...] = ("title",)  # "title", "category", "brand" or attribute column names
    ngram_max: int = 2  # uni-grams up to this n
    min_count: int = 5  # products a term must appear in to enter the vocabulary
    head_min_count: int = 100  # products a term must appear in to be a label on its own
    max_head_labels: int = 1000  # cap on head labels (most frequent kept)
    tail_clusters: int = 64  # k-means clusters of long-tail terms (capped by the number of tail terms)
    min_token_chars: int = 2  # shorter tokens (after normalising) are dropped, digits excepted
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WeakLabelConfig:
        values = dict(data)
        if "text_fields" in values:
            values["text_fields"] = tuple(values["text_fields"])
        return cls(**values)


def normalize_text(text: str) -> str:
    """NFKC, lower case, accents removed (tokenize then keeps runs of letters and digits)."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).lower())
    return "".join(ch for ch in text if not unicodedata.combining(ch))


def tokenize(text: str, min_chars: int = 2) -> list[str]:
    """Tokens of normalised text without stop words and without 1-letter tokens."""
    return [t for t in _TOKEN.findall(normalize_text(text))
            if t not in STOP_WORDS and (len(t) >= min_chars or t.isdigit())]


def product_terms(product: Product, config: WeakLabelConfig) -> set[str]:
    """The set of n-grams (n <= ngram_max) of the product's configured text fields."""
    terms: set[str] = set()
    for name in config.text_fields:
        if name == "title":
            text = product.title
        elif name == "category":
            text = product.category
        elif name == "brand":
            text = product.brand
        else:
            text = product.attributes.get(name, "")
        tokens = tokenize(text, config.min_token_chars)
        for n in range(1, config.ngram_max + 1):
            terms.update(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return terms


@dataclass
class WeakLabels:
    """The label vocabulary, each product's label indices, the tail-term clustering and a report."""

    labels: list[str]  # head terms, then "cluster:<k>" names
    product_labels: dict[str, list[int]]
    clusters: dict[str, list[str]]  # cluster label -> its tail terms (most frequent first)
    config: WeakLabelConfig
    report: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"format": WEAK_LABELS_FORMAT, "config": self.config.to_json(), "labels": self.labels,
                "clusters": self.clusters, "report": self.report, "products": self.product_labels}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WeakLabels:
        if data.get("format") != WEAK_LABELS_FORMAT:
            raise ValueError(f"not a weak-labels file: format {data.get('format')!r}, expected {WEAK_LABELS_FORMAT!r}")
        return cls(labels=list(data["labels"]), product_labels={k: list(v) for k, v in data["products"].items()},
                   clusters=dict(data["clusters"]), config=WeakLabelConfig.from_json(data["config"]),
                   report=dict(data["report"]))


def _cluster_tail(tail: list[str], head: list[str], docs: list[set[str]], config: WeakLabelConfig,
                  ) -> dict[str, int]:
    """{tail term: cluster index}: k-means over each tail term's TF-IDF profile of co-occurring head terms."""
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfTransformer

    if not tail:
        return {}
    k = min(config.tail_clusters, len(tail))
    tail_index = {t: i for i, t in enumerate(tail)}
    head_index = {t: i for i, t in enumerate(head)}
    counts = np.zeros((len(tail), max(1, len(head))), dtype=np.float32)
    for terms in docs:
        tails = [tail_index[t] for t in terms if t in tail_index]
        heads = [head_index[t] for t in terms if t in head_index]
        if tails and heads:
            counts[np.ix_(tails, heads)] += 1.0
    profile = TfidfTransformer().fit_transform(counts).toarray()  # rows L2-normalised
    # a small catalog has few head terms, so many tail terms share one profile: more clusters than distinct
    # profiles left clusters without a term (labels no image carries) and a ConvergenceWarning
    k = min(k, len(np.unique(profile.round(6), axis=0)))
    if k <= 1:
        return dict.fromkeys(tail, 0)
    assignment = KMeans(n_clusters=k, n_init=4, random_state=config.seed).fit_predict(profile)
    number = {c: i for i, c in enumerate(sorted(set(assignment.tolist())))}  # no gaps should one stay empty
    return {t: number[int(c)] for t, c in zip(tail, assignment, strict=True)}


def build_weak_labels(products: Iterable[Product], config: WeakLabelConfig = WeakLabelConfig()) -> WeakLabels:
    """Mine weak labels from the products' text (see the module docstring)."""
    products = list(products)
    docs = [product_terms(p, config) for p in products]
    frequency: Counter[str] = Counter(t for terms in docs for t in terms)
    vocabulary = {t: c for t, c in frequency.items() if c >= config.min_count}
    ranked = sorted(vocabulary, key=lambda t: (-vocabulary[t], t))
    head = [t for t in ranked if vocabulary[t] >= config.head_min_count][:config.max_head_labels]
    head_set = set(head)
    tail = [t for t in ranked if t not in head_set]
    cluster_of = _cluster_tail(tail, head, docs, config)
    n_clusters = max(cluster_of.values(), default=-1) + 1
    labels = head + [f"cluster:{k}" for k in range(n_clusters)]
    label_index = {t: i for i, t in enumerate(head)}
    product_labels: dict[str, list[int]] = {}
    for product, terms in zip(products, docs, strict=True):
        indices = {label_index[t] for t in terms if t in label_index}
        indices.update(len(head) + cluster_of[t] for t in terms if t in cluster_of)
        product_labels[product.product_id] = sorted(indices)
    clusters: dict[str, list[str]] = {f"cluster:{k}": [] for k in range(n_clusters)}
    for term in tail:  # most frequent first
        clusters[f"cluster:{cluster_of[term]}"].append(term)
    report = weak_label_report(frequency, vocabulary, head, clusters, product_labels, labels)
    return WeakLabels(labels, product_labels, clusters, config, report)


def weak_label_report(frequency: Counter[str], vocabulary: dict[str, int], head: Sequence[str],
                      clusters: dict[str, list[str]], product_labels: dict[str, list[int]],
                      labels: Sequence[str]) -> dict[str, Any]:
    """Vocabulary size, labels per image, coverage, head/tail distribution before and after clustering."""
    per_image = np.array([len(v) for v in product_labels.values()] or [0])
    label_counts = np.bincount(np.concatenate([np.array(v, dtype=np.int64) for v in product_labels.values()]
                                              or [np.zeros(0, dtype=np.int64)]), minlength=len(labels))
    tail_terms = [t for members in clusters.values() for t in members]
    return {
        "products": len(product_labels),
        "terms_seen": len(frequency),
        "vocabulary_size": len(vocabulary),
        "head_labels": len(head),
        "tail_terms": len(tail_terms),
        "tail_clusters": len(clusters),
        "labels": len(labels),
        "labels_per_image": {"mean": round(float(per_image.mean()), 3), "median": float(np.median(per_image)),
                             "max": int(per_image.max())},
        "coverage": round(float((per_image > 0).mean()), 4),  # fraction of images with at least one label
        "coverage_head_only": round(float(np.mean([float(any(i < len(head) for i in v))
                                                   for v in product_labels.values()] or [0.0])), 4),
        "images_per_label_before": _distribution([vocabulary[t] for t in head] + [vocabulary[t] for t in tail_terms]),
        "images_per_label_after": _distribution(label_counts.tolist()),
        "head_examples": list(head[:30]),
        "cluster_examples": {name: members[:8] for name, members in list(clusters.items())[:20]},
    }


def _distribution(counts: Sequence[int]) -> dict[str, float]:
    """Percentiles of images per label (how long the tail is)."""
    if not counts:
        return {}
    values = np.asarray(counts, dtype=np.float64)
    return {"labels": int(len(values)), "min": float(values.min()), "p10": float(np.percentile(values, 10)),
            "median": float(np.median(values)), "p90": float(np.percentile(values, 90)), "max": float(values.max()),
            "under_20_images": int((values < 20).sum())}


def save_weak_labels(weak: WeakLabels, path: str | Path) -> None:
    """Write the weak labels JSON (temporary name, then rename) and a Markdown report beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(weak.to_json(), separators=(",", ":")), encoding="utf-8")
    tmp.replace(path)
    path.with_suffix(".report.md").write_text(report_markdown(weak), encoding="utf-8")


def load_weak_labels(path: str | Path) -> WeakLabels:
    """Read a weak labels JSON written by `save_weak_labels`."""
    return WeakLabels.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def report_markdown(weak: WeakLabels) -> str:
    """The human-readable report of a weak-label run."""
    r = weak.report
    lines = ["# Weak labels report", "",
             f"- products: {r['products']}; terms seen: {r['terms_seen']}; vocabulary "
             f"(>= {weak.config.min_count} products): {r['vocabulary_size']}",
             f"- head labels (>= {weak.config.head_min_count} products): {r['head_labels']}; tail terms: "
             f"{r['tail_terms']} grouped into {r['tail_clusters']} clusters; labels in all: {r['labels']}",
             f"- labels per image: mean {r['labels_per_image']['mean']}, median {r['labels_per_image']['median']}, "
             f"max {r['labels_per_image']['max']}",
             f"- coverage: {r['coverage']:.1%} of images have a label ({r['coverage_head_only']:.1%} from head "
             "terms alone)", "",
             "| images per label | labels | min | p10 | median | p90 | max | labels under 20 images |",
             "|---|---|---|---|---|---|---|---|"]
    for name, key in (("before clustering (terms)", "images_per_label_before"),
                      ("after clustering (labels)", "images_per_label_after")):
        d = r[key]
        if d:
            lines.append(f"| {name} | {d['labels']} | {d['min']:.0f} | {d['p10']:.0f} | {d['median']:.0f} | "
                         f"{d['p90']:.0f} | {d['max']:.0f} | {d['under_20_images']} |")
    lines += ["", "Head terms (most frequent): " + ", ".join(r["head_examples"]), "",
              "| cluster | example tail terms |", "|---|---|"]
    lines += [f"| {name} | {', '.join(terms)} |" for name, terms in r["cluster_examples"].items()]
    return "\n".join(lines) + "\n"
