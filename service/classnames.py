"""Class labels as people write them, and the ImageNet-1k names (index -> WordNet id, names).

ImageNet index ``i`` is the ``i``-th WordNet synset in sorted order (``n01440764`` tench ...
``n15075141`` toilet tissue), as in the ILSVRC-2012 ``LOC_synset_mapping.txt`` file, kept as data in
``service/data/imagenet_classes.tsv`` (read once, when a 1000-class model is served); each entry keeps
the synset's comma-separated names, the first being its usual label. ``ClassIndex.resolve`` accepts
an index, a WordNet id or any of the names (case-insensitive), so ``"golden retriever"``,
``"n02099601"`` and ``207`` are the same class. A checkpoint's own ``class_names`` take precedence.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence


MAX_LABEL_CHARS = 200        # one limit for a label on every route (JSON, forms, prompts' parts)


class LabelError(ValueError):
    """A label that names no class, or more than one (one-line message)."""


class ClassIndex:
    """Turns what a person types (an index, a class name, a synonym, an id) into a class index.

    Lookup order, first hit wins: an ``int``; a name exactly as written; a name in any case; an id
    (WordNet id for ImageNet); a synonym in any case; a decimal string. A text that fits several
    classes at its first hit (ImageNet has two "crane"s) is an error that lists them.
    """

    def __init__(self, num_classes: int, names: Sequence[str] = (), synonyms: Sequence[Sequence[str]] = (),
                 ids: Sequence[str] = ()):
        self.num_classes = num_classes
        self.names = tuple(names)
        self._tables: list[dict[str, list[int]]] = []
        for keys, fold in ((self.names, False), (self.names, True), (tuple(ids), True)):
            self._tables.append(_table([[k] for k in keys], fold))
        self._tables.append(_table(synonyms, True))

    def resolve(self, label: int | str) -> int:
        if isinstance(label, bool):
            raise LabelError(f"label {label!r} is not a class index or name")
        if isinstance(label, int):
            if not 0 <= label < self.num_classes:
                raise LabelError(f"label {label} is out of range: class indices are 0..{self.num_classes - 1}")
            return label
        text = str(label).strip()
        if len(text) > MAX_LABEL_CHARS:       # checked first: the text is neither parsed nor echoed back
            raise LabelError(f"a label is at most {MAX_LABEL_CHARS} characters (a class index or name), "
                             f"not {len(text)}")
        for i, table in enumerate(self._tables):
            hits = table.get(text if i == 0 else text.casefold())
            if hits and len(hits) == 1:
                return hits[0]
            if hits:
                listed = ", ".join(f"{h} ({self.names[h]})" for h in hits[:5])
                raise LabelError(f"class name {text!r} fits several classes: {listed}; pass the index instead")
        if text.isascii() and text.isdecimal():       # "３" or "٣" are not indices (int() would take them)
            if len(text.lstrip("0")) > len(str(self.num_classes)):     # int() of 4,300+ digits raises
                raise LabelError(f"label {text[:20]}... is out of range: class indices are 0..{self.num_classes - 1}")
            return self.resolve(int(text))
        hint = f"e.g. {self.names[0]!r} or 0" if self.names else "this model has no class names"
        raise LabelError(f"unknown class {text!r}: give an index 0..{self.num_classes - 1} or a class name ({hint})")

    @classmethod
    def for_model(cls, num_classes: int, class_names: Sequence[str] = ()) -> "ClassIndex":
        """The model's own names; else ImageNet's for a 1000-class model; else indices only."""
        if class_names:
            return cls(num_classes, class_names)
        if num_classes == IMAGENET_SIZE:
            synsets = imagenet_synsets()
            return cls(num_classes, [names.split(", ")[0] for _, names in synsets],
                       [names.split(", ") for _, names in synsets], [wnid for wnid, _ in synsets])
        return cls(num_classes)


def _table(keys_per_class: Sequence[Sequence[str]], fold: bool) -> dict[str, list[int]]:
    table: dict[str, list[int]] = {}
    for index, keys in enumerate(keys_per_class):
        for key in keys:
            hits = table.setdefault(key.casefold() if fold else key, [])
            if index not in hits:
                hits.append(index)
    return table


IMAGENET_FILE = Path(__file__).resolve().parent / "data" / "imagenet_classes.tsv"
IMAGENET_SIZE = 1000


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[tuple[str, str], ...]:
    """``(wordnet_id, "name, synonym, ...")`` per ImageNet index, read once from ``data/imagenet_classes.tsv``."""
    rows = []
    for line in IMAGENET_FILE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            wnid, _, names = line.partition("\t")
            rows.append((wnid, names))
    if len(rows) != IMAGENET_SIZE:
        raise RuntimeError(f"{IMAGENET_FILE}: {len(rows)} classes, expected {IMAGENET_SIZE}")
    return tuple(rows)
