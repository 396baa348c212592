"""English text from files every Python installation has: sentences from the standard library's docstrings (parsed
from source, never imported), for rendered images and text inputs; no download, the same on every machine.

>>> len(sample_sentences(16)), sample_sentences(3) == sample_sentences(3)
(16, True)
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import random
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from edgeq.errors import UserError

# Docstrings of these standard-library modules (pure Python in CPython 3.10-3.13) supply English sentences.
_SENTENCE_MODULES = ("argparse", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses",
                     "difflib", "enum", "fractions", "ftplib", "functools", "gettext", "gzip", "heapq", "http", "imaplib",
                     "inspect", "ipaddress", "json", "logging", "mailbox", "optparse", "pathlib", "pickle", "pydoc", "queue",
                     "random", "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile",
                     "textwrap", "threading", "tokenize", "typing", "urllib", "uuid", "warnings", "weakref", "zipfile")


def fitting_line(rng: random.Random, line: str, words: tuple[str, ...], draw, font, room: int, extra: int) -> str:
    """LINE and up to EXTRA more random WORDS, stopping before the line would run past ROOM pixels in FONT."""
    for _ in range(extra):
        longer = f"{line} {rng.choice(words)}"
        if draw.textlength(longer, font=font) > room:
            break
        line = longer
    return line


def sample_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` different English sentences from Python standard-library docstrings, in an order fixed by `seed`.

    >>> len(sample_sentences(16)), sample_sentences(3) == sample_sentences(3)
    (16, True)
    """
    pool = list(sentence_pool())
    if n > len(pool):
        raise UserError(f"asked for {n} sentences; the standard library's docstrings give {len(pool)}", "ask for fewer")
    random.Random(seed).shuffle(pool)
    return pool[:n]


@functools.lru_cache(maxsize=1)
def sentence_pool() -> tuple[str, ...]:
    """Prose sentences of 6 to 30 words from module, class and function docstrings, parsed from source (no import)."""
    sentences: set[str] = set()
    for doc in stdlib_docstrings():
        sentences.update(_prose(doc))
    return tuple(sorted(sentences))


def stdlib_docstrings(whole: bool = False) -> Iterator[str]:
    """Every module, class and function docstring of the stdlib modules in `_SENTENCE_MODULES` (or, `whole`, of the
    whole standard library but its tests and GUI code: about 3x more text), parsed from source, never imported."""
    for path in _whole_stdlib_sources() if whole else _stdlib_sources():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield ast.get_docstring(node) or ""


def _stdlib_sources() -> list[Path]:
    paths = []
    for module in _SENTENCE_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        origin = Path(spec.origin)
        paths.extend(sorted(origin.parent.glob("*.py")) if origin.name == "__init__.py" else [origin])
    return paths


def _whole_stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo"}
    return [p for p in sorted(root.rglob("*.py")) if not skipped & set(p.relative_to(root).parts)]


def _prose(docstring: str) -> list[str]:
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", docstring)]
    found = []
    for paragraph in paragraphs:
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
            words = sentence.split()
            letters = sum(c.isalpha() or c.isspace() for c in sentence)
            if (6 <= len(words) <= 30 and sentence[0].isupper() and sentence.endswith(".") and letters > 0.9 * len(sentence)
                    and not re.search(r">>>|::|\w\(|[=_{}\[\]`*]", sentence)):
                found.append(sentence)
    return found
