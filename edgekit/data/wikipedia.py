"""The Wikipedia excerpt shipped in gensim's test data, as plain-text articles.

``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
holds ~200 real articles of MediaWiki XML. We parse it (without importing gensim), strip the
markup to plain prose, drop redirects and near-empty pages, and cache the result as JSON.
The split is by article and fixed: a hash of the title puts ~80% in ``calib`` and ~20% in
``eval``, so the two never share text whatever else changes.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

from edgekit.cache import cached_entry
from edgekit.data import Item
from edgekit.errors import EdgekitError

DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CACHE_NAME = "wikipedia-enwiki-excerpt-v1"
ARTICLES_FILE = "articles.json"
EVAL_PERCENT = 20
MIN_CHARS = 500  # shorter pages after cleaning are stubs / disambiguation lists
DROPPED_SECTIONS = {
    "references",
    "external links",
    "see also",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
    "works cited",
}
_DROPPED_NAMESPACES = (
    "file",
    "image",
    "category",
    "media",
    "wikipedia",
    "wp",
    "template",
    "help",
    "portal",
    "special",
    "user",
    "talk",
    "wikt",
    "wiktionary",
    "module",
    "draft",
)
_DROPPED_TAGS = (
    "math",
    "gallery",
    "timeline",
    "score",
    "syntaxhighlight",
    "source",
    "chem",
    "imagemap",
    "hiero",
    "graph",
    "mapframe",
    "templatedata",
    "noinclude",
)


def dump_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise EdgekitError("the wikipedia data set needs gensim's test data: pip install --no-deps gensim==4.4.0")
    path = Path(spec.submodule_search_locations[0]) / DUMP
    if not path.is_file():
        raise EdgekitError(f"{path} is missing; reinstall gensim")
    return path


# -- markup stripping ------------------------------------------------------------------------------
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)


def _remove_innermost(pattern: re.Pattern, text: str) -> str:
    """Remove nested spans innermost first; an unbalanced opener stays as text instead of
    swallowing the rest of the article."""
    previous = None
    while previous != text:
        previous, text = text, pattern.sub("", text)
    return text


_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


def _link_text(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    namespace, colon, _ = target.partition(":")
    namespace = namespace.strip()
    if colon and (namespace.lower() in _DROPPED_NAMESPACES or re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*", namespace)):
        return ""  # files, categories, interlanguage links: not prose
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def _drop_sections(text: str) -> str:
    kept: list[str] = []
    dropping_level = 0
    for line in text.split("\n"):
        heading = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1\s*", line)
        if heading:
            level = len(heading.group(1))
            if dropping_level and level > dropping_level:
                continue
            dropping_level = level if heading.group(2).strip().lower() in DROPPED_SECTIONS else 0
            if not dropping_level:
                kept.append(heading.group(2).strip())
            continue
        if not dropping_level:
            kept.append(line)
    return "\n".join(kept)


def strip_markup(wikitext: str) -> str:
    """MediaWiki markup → plain text lines (templates, tables, refs, files, tags and quotes removed)."""
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref[^>]*>.*?</ref\s*>", "", text, flags=re.I | re.S)
    for tag in _DROPPED_TAGS:
        text = re.sub(rf"<{tag}[^>]*>.*?</{tag}\s*>", "", text, flags=re.I | re.S)
    text = _remove_innermost(_TEMPLATE, text)
    text = _remove_innermost(_TABLE, text)
    previous = None
    while previous != text:  # innermost links first, so file captions with links vanish whole
        previous, text = text, _LINK.sub(_link_text, text)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?:)?//[^\]]*\]", "", text)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = html.unescape(text).replace("\u00a0", " ")
    text = _drop_sections(text)
    lines: list[str] = []
    for line in text.split("\n"):
        line = re.sub(r"^[*#:;]+\s*", "", line.strip())
        line = re.sub(r"\s+", " ", line).strip()
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line).replace(" ,", ",").replace(" .", ".").strip()
        if line == "----" or re.match(r"\[\[(file|image):", line, re.I) or (lines and not lines[-1] and not line):
            continue
        lines.append(line)
    return "\n".join(lines).strip()


# -- parsing and caching ---------------------------------------------------------------------------
def parse_dump(path: Path) -> list[dict[str, str]]:
    """[{"title", "text"}] for every main-namespace, non-redirect article with real prose."""
    articles = []
    with bz2.open(path, "rb") as stream:
        for _, element in ElementTree.iterparse(stream, events=("end",)):
            if not element.tag.endswith("}page"):
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in element}
            title = fields["title"].text or ""
            namespace = (fields["ns"].text or "0") if "ns" in fields else "0"
            text_element = element.find("./{*}revision/{*}text")
            wikitext = (text_element.text or "") if text_element is not None else ""
            element.clear()
            if namespace != "0" or "redirect" in fields or wikitext.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = strip_markup(wikitext)
            if len(text) >= MIN_CHARS:
                articles.append({"title": title, "text": text})
    return articles


def _build(target: Path, source: Path) -> None:
    articles = parse_dump(source)
    (target / ARTICLES_FILE).write_text(json.dumps(articles, ensure_ascii=False))


def articles() -> list[dict[str, str]]:
    """All cleaned articles in dump order (parsed once, then read from the edgekit cache)."""
    source = dump_path()
    entry = cached_entry(CACHE_NAME, lambda tmp: _build(tmp, source))
    return json.loads((entry / ARTICLES_FILE).read_text())


def split_of(title: str) -> str:
    """``eval`` for ~EVAL_PERCENT% of titles, chosen by a stable hash, else ``calib``."""
    bucket = int.from_bytes(hashlib.sha256(title.encode()).digest()[:4], "big") % 100
    return "eval" if bucket < EVAL_PERCENT else "calib"


def items(split: str, count: int | None = None) -> list[Item]:
    if split not in ("calib", "eval"):
        raise EdgekitError(f"unknown split '{split}' (calib or eval)")
    chosen = [Item(raw=a["text"], name=a["title"]) for a in articles() if split_of(a["title"]) == split]
    return chosen if count is None else chosen[: max(0, int(count))]


def token_stream(
    tokenizer, split: str = "eval", max_tokens: int | None = None, separator_id: int | None = None
) -> np.ndarray:
    """The split's articles tokenised and concatenated (``separator_id`` between articles, by
    default the tokenizer's EOS), truncated to ``max_tokens``: the input of a perplexity run."""
    if separator_id is None:
        separator_id = tokenizer.eos_token_id
    separator = (
        [int(separator_id)] if separator_id is not None else tokenizer("\n\n", add_special_tokens=False).input_ids
    )
    ids: list[int] = []
    for item in items(split):
        if max_tokens is not None and len(ids) >= max_tokens:
            break
        if ids:
            ids += separator
        ids += tokenizer(item.raw, add_special_tokens=False, verbose=False).input_ids
    return np.asarray(ids[:max_tokens] if max_tokens is not None else ids, dtype=np.int64)
