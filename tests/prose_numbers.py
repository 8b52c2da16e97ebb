"""Find numbers in a lesson's prose that nothing in the lesson backs up.

CONTRIBUTING.md: "Numbers quoted in prose must match what the cells print." This module
reads a solution notebook's markdown cells and reports every number that

* is not backed by a stored **output** of the same notebook (stream text, ``text/plain``,
  ``text/markdown``, ``text/html`` of any code cell, in any order), nor by a numeric
  **literal in a code cell** (a value the lesson sets, e.g. ``batch_size=100``; comments
  and strings do not count), and
* is not listed in the markdown cell's citation metadata, ``"cited": {"<number as
  written>": "<source>"}`` (numbers quoted from a paper, a datasheet, the course plan), and
* is not exempt (below).

Command line: ``python tests/prose_numbers.py solutions/NN_slug.ipynb [...]`` prints each
unmatched number with its cell index and sentence and exits 1 if there is any.

Matching tolerance (prose value ``v`` written with ``d`` decimals, candidate ``w``)
------------------------------------------------------------------------------------
* ``|v - w| <= 0.5 * 10**-d``: trailing zeros (0.50 = 0.5), thousands separators
  (1,031,744 = 1031744; also thin spaces), and rounding a longer printed value to the
  digits quoted (12.5 ms from 12.53) all match; quoting *more* digits than printed does not.
* Percent: "98.4 %" matches a printed 98.4 or 0.984 (or 0.98437); a plain "0.984"
  matches a printed "98.4%".
* Ratios ("2.96×", "2x faster", "40 times"): an integer ratio must match a printed
  ratio (a number followed by × or x); a ratio with decimals matches any printed number.
  Code literals never back a ratio: a speed-up or a compression factor is a result.
* Scientific notation: 6·10^7, 6 × 10⁷, 1e-4, 2**-32, 2^-32, 2⁻³² are values; powers
  are compared at the precision of the printed candidate.
* Multipliers: "7.0 million", "2.8 MB", "60 k" also match the printed value scaled by
  10^3 / 10^6 / 10^9 (or 2^10 / 2^20 / 2^30 for kB, MB, GB).
* Signs are ignored ("−128" matches a printed -128 and 128).

Exempt (not checked)
--------------------
* Text inside fenced code blocks, inline code, LaTeX math ($...$, $$...$$, \\(...\\),
  \\[...\\]), HTML tags, link targets and URLs.
* Numbers that are part of a name: attached to letters on the left (INT8, MobileNetV2,
  ReLU6, Cortex-M4, fp32, x86, Top-1, MobileNetV2-1.0, arXiv:1712.05877) or glued to
  letters on the right that are not a unit (2D, 1st, 3rd); versions with two dots (2.14.1).
* Numbers after a naming word: lesson, section, exercise, step, table, figure, chapter,
  part, cell, appendix, equation, item, question, version, layer, block, stage, seed,
  epoch, row, column, line, page, Python, torch, PyTorch, ONNX, opset, Pi, PEP, and
  chains of them ("lessons 03 and 05", "sections 2–4").
* Structure of the text: heading numbers ("## 8. A budget"), list-item markers ("1. "),
  and the "Expected time" line (a learner's time, not something the notebook computes).
* Small structural integers, written as plain integers (no decimals, no %, no ×):
  0–10 (counts, small bit widths, lesson numbers, threads, batch 1), the limits of the
  common integer formats (15, 127, 128, 255, 256, 32767, 32768, 65535, 65536, 2147483647,
  2147483648, 4294967295, 4294967296), and any integer followed by "-bit", "bit" or
  "bits" (16-bit, 32 bits). A ratio ("4×") or a percentage ("5 %") is never structural.
  A small integer followed by a unit of measurement ("6 points", "2 ms", "4 dB", "8 KiB")
  is a measurement and is checked.
* Shapes and kernel sizes: integers in a product "a×b" (3×3, 1×28×28, N×C×H×W).
* Years (1900–2099, no separator) in a citation: inside parentheses or after "et al.".
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
import tokenize
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------- numbers

_SUP = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")

NUMBER = re.compile(
    r"""
    (?<![\d.,])
    (?P<mant>
        \d{1,3}(?:[,\u2009\u202f]\d{3})+(?:\.\d+)?    # 1,031,744  2,764,872.5
      | \d+\.\d+ | \d+ | \.\d+                         # 0.984  12  .5
    )
    (?:
        (?P<e>[eE][-+−]?\d+)(?![A-Za-z])                       # 1e-4  6.0e+07
      | [ ]?[·×x*⋅][ ]?10[ ]?(?:\^|\*\*)[ ]?\(?(?P<e10>[-−]?\d+)\)?   # 6·10^7  6 × 10^-3
      | [ ]?[·×x*⋅][ ]?10(?P<e10s>[⁻⁺]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+)            # 6·10⁷
      | [ ]?[·×x*⋅][ ]?10<sup>(?P<e10h>[-−]?\d+)</sup>            # 6·10<sup>7</sup>
      | <sup>(?P<powh>[-−]?\d+(?:\.\d+)?)</sup>                  # 2<sup>−7</sup>
      | [ ]?(?:\^|\*\*)[ ]?\(?(?P<pow>[-−]?\d+(?:\.\d+)?)\)?      # 2^-32  2**-32
      | (?P<pows>[⁻⁺]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+)                           # 2⁻³²
    )?
    """,
    re.VERBOSE,
)

# unit-like words glued to a number ("12ms", "2.8MB") or after it ("2.8 MB"); value = scale
_MULTIPLIERS = {
    "thousand": (1e3,), "million": (1e6,), "billion": (1e9,),
    "k": (1e3,), "K": (1e3,), "M": (1e6,), "G": (1e9,),
    "kB": (1e3, 2.0**10), "KB": (1e3, 2.0**10), "KiB": (2.0**10,),
    "MB": (1e6, 2.0**20), "MiB": (2.0**20,), "GB": (1e9, 2.0**30), "GiB": (2.0**30,),
    "GMAC": (1e9,), "MMAC": (1e6,), "GMACs": (1e9,), "MMACs": (1e6,),
    "GHz": (1e9,), "MHz": (1e6,), "kHz": (1e3,),
    "GFLOP": (1e9,), "MFLOP": (1e6,), "GFLOPs": (1e9,), "MFLOPs": (1e6,),
}
_UNITS = {
    "ms", "s", "us", "µs", "μs", "ns", "min", "h", "Hz", "kHz", "MHz", "GHz",
    "B", "b", "x", "X", "bit", "bits", "MAC", "MACs", "px", "pt", "pp", "dB",
    *_MULTIPLIERS,
}
_ORDINALS = {"st", "nd", "rd", "th"}  # "the 99.99th percentile" is a number, "3rd" is small
_NAME_WORDS = {
    "lesson", "lessons", "section", "sections", "§", "exercise", "exercises", "step",
    "steps", "table", "tables", "figure", "figures", "fig", "chapter", "chapters", "part",
    "parts", "cell", "cells", "appendix", "equation", "equations", "eq", "item", "items",
    "question", "questions", "version", "versions", "v", "layer", "layers", "block",
    "blocks", "stage", "seed", "epoch", "row", "rows", "column", "columns", "line", "lines",
    "page", "pages", "python", "torch", "pytorch", "torchvision", "torchao", "onnx",
    "onnxruntime", "opset", "executorch", "numpy", "pi", "pep", "rfc", "ieee", "armv",
}
_CHAIN = re.compile(r"\s*(?:,|,?\s*and|,?\s*or|&|–|—|-|to|/)\s*", re.IGNORECASE)
_FORMAT_LIMITS = {15, 127, 128, 255, 256, 32767, 32768, 65535, 65536,
                  2147483647, 2147483648, 4294967295, 4294967296}
SMALL_INT_MAX = 10
# a small integer followed by one of these is a measurement ("6 points", "2 ms"), not structure
_MEASUREMENT_UNITS = re.compile(
    r"[ \u00a0]?(?:points?|pp|dB|ms|s|µs|μs|us|ns|seconds?|minutes?|min|bytes?|B|KiB|kB|KB|"
    r"MiB|MB|GB|GiB|GHz|MHz|G?MACs?(?:/s)?|GMAC/s|output steps?|steps? of)\b"
)


@dataclass
class Number:
    """One number as written: its value, the precision it was written with, its kind."""

    text: str
    start: int
    end: int
    value: float
    tol: float  # half a unit in the last written place (0 for an exact power)
    kind: str = "plain"  # "plain", "percent", "ratio"
    is_power: bool = False
    scales: tuple[float, ...] = ()
    exempt: str = ""  # why it is not checked, "" if it is


def _mantissa(text: str) -> tuple[float, int]:
    digits = re.sub(r"[,\u2009\u202f]", "", text)
    decimals = len(digits.split(".", 1)[1]) if "." in digits else 0
    return float(digits), decimals


def _parse(m: re.Match) -> tuple[float, float, bool]:
    """value, tolerance, is_power of a NUMBER match."""
    mant, decimals = _mantissa(m["mant"])
    tol = 0.5 * 10.0**-decimals
    exp = m["e"] or m["e10"] or m["e10h"] or (m["e10s"] or "").translate(_SUP) or None
    if exp is not None:
        e = int(exp.replace("−", "-")[1:] if exp[0] in "eE" else exp.replace("−", "-"))
        scale = 10.0**e
        return mant * scale, tol * scale, False
    power = m["pow"] or m["powh"] or (m["pows"] or "").translate(_SUP) or None
    if power is not None:
        try:
            return mant ** float(power.replace("−", "-")), 0.0, True
        except (OverflowError, ZeroDivisionError):
            return math.inf, 0.0, True
    return mant, tol, False


def _word_after(text: str, end: int) -> str:
    m = re.match(r"[ \u00a0]?([A-Za-zµμ]+)", text[end:])
    return m[1] if m else ""


def numbers(text: str) -> list[Number]:
    """Every number in ``text`` with its kind and scale words, no exemptions applied."""
    found = []
    for m in NUMBER.finditer(text):
        value, tol, is_power = _parse(m)
        rest = text[m.end():]
        kind = "plain"
        if re.match(r"\s?%", rest):
            kind = "percent"
        elif re.match(r"\s?×(?!\s?\d)(?![A-Za-z])", rest) or re.match(r"[xX](?![A-Za-z0-9])", rest) \
                or re.match(r"\s+times\b", rest):
            kind = "ratio"
        word = _word_after(text, m.end())
        scales = _MULTIPLIERS.get(word, ())
        found.append(Number(m[0], m.start(), m.end(), abs(value), tol, kind, is_power, scales))
    return found


# ------------------------------------------------------------------------ markdown masking

_MASKS = [
    re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", re.MULTILINE | re.DOTALL),  # fences
    re.compile(r"(`+).+?\1", re.DOTALL),                      # inline code
    re.compile(r"\$\$.+?\$\$", re.DOTALL),                    # display math
    re.compile(r"\\\[.+?\\\]", re.DOTALL),
    re.compile(r"\\begin\{(\w+\*?)\}.+?\\end\{\1\}", re.DOTALL),
    re.compile(r"(?<![\\$])\$[^$]+?(?<!\\)\$", re.DOTALL),    # inline math
    re.compile(r"\\\(.+?\\\)", re.DOTALL),
    re.compile(r"<!--.*?-->", re.DOTALL),                     # HTML comments and tags
    re.compile(r"</?(?!sup>)[A-Za-z][^>\n]*>"),  # <sup> stays: 10<sup>−7</sup> is a number
    re.compile(r"\]\([^)]*\)"),                               # link and image targets
    re.compile(r"^\s*\[[^\]]+\]:\s*\S+.*$", re.MULTILINE),    # reference-style link targets
    re.compile(r"https?://\S+|www\.\S+"),                     # bare URLs
]


def mask(markdown: str) -> str:
    """``markdown`` with code, math, tags and URLs blanked out (same length, same lines)."""
    chars = list(markdown)
    for pattern in _MASKS:
        for m in pattern.finditer("".join(chars)):
            for i in range(m.start(), m.end()):
                if chars[i] != "\n":
                    chars[i] = " "
    return "".join(chars)


def _previous_word(text: str, start: int) -> str:
    m = re.search(r"([A-Za-z§]+)[`*_]*\.?[\s\u00a0]*(?:[≥≤><=~≈]+=?[\s\u00a0]*)?[`*_]*\Z",
                  text[:start])
    return m[1].lower() if m else ""


def _exemption(text: str, n: Number, previous: Number | None, original: str) -> str:
    """Why ``n`` (a number in masked markdown ``text``) is not checked, or "".

    ``original`` is the unmasked markdown: a naming word may sit in inline code
    ("`torchao` 0.18").
    """
    before, after = text[:n.start], text[n.end:]
    left = re.search(r"[A-Za-z0-9_\-./:]*\Z", before)[0]
    if re.search(r"[A-Za-z]", left) and not re.fullmatch(r"[-−–]", left):
        return "part of a name"
    if re.match(r"\.\d+\.\d+", text[n.end - 2 if "." in n.text else n.end:]) or \
            re.match(r"\.\d", after) and "." in n.text:
        return "version"
    glued = re.match(r"[A-Za-zµμ]+", after)
    if glued and n.kind == "plain" and glued[0] not in _UNITS | _ORDINALS \
            and not re.match(r"e[-+]?\d", after):
        return "part of a name"
    if re.fullmatch(r"\d+", n.text) and re.match(r"-?\s?bits?\b", after, re.IGNORECASE):
        return "bit width"
    if _previous_word(original, n.start) in _NAME_WORDS:
        return "reference (lesson, section, version, ...)"
    if previous is not None and previous.exempt.startswith("reference") \
            and _CHAIN.fullmatch(text[previous.end:n.start]):
        return "reference (lesson, section, version, ...)"
    line_start = text.rfind("\n", 0, n.start) + 1
    line = text[line_start:text.find("\n", n.start) if "\n" in after else len(text)]
    head = text[line_start:n.start]
    if re.fullmatch(r"\s*#+\s*(?:\d+\.)*", head) or re.fullmatch(r"\s*", head) and \
            re.fullmatch(r"\d+", n.text) and re.match(r"[.)]\s", after):
        return "heading or list number"
    if re.search(r"expected time|\btime:", line, re.IGNORECASE):
        return "expected learner time"
    is_int = n.kind == "plain" and re.fullmatch(r"\d+", n.text) is not None
    if is_int and (re.search(r"[\dA-Za-z]\s?×\s?\Z", before) or re.match(r"\s?×\s?[\dA-Za-z]", after)):
        return "shape or kernel size (a×b)"
    measured = re.match(_MEASUREMENT_UNITS, after)
    if is_int and (n.value <= SMALL_INT_MAX and not measured or n.value in _FORMAT_LIMITS):
        return "small structural integer"
    if is_int and 1900 <= n.value <= 2099:
        opened = before.rfind("(") > before.rfind(")")
        if opened or re.search(r"et al\.?,?\s*\Z", before):
            return "year in a citation"
    return ""


def prose_numbers(markdown: str) -> list[Number]:
    """Numbers of a markdown cell, each with ``exempt`` set to the reason it is not checked."""
    text = mask(markdown)
    result: list[Number] = []
    for n in numbers(text):
        n.exempt = _exemption(text, n, result[-1] if result else None, markdown)
        result.append(n)
    return result


# ------------------------------------------------------------------------------ sources


@dataclass
class Sources:
    """What may back a prose number: printed outputs and code literals."""

    printed: list[Number] = field(default_factory=list)
    literals: list[Number] = field(default_factory=list)


_FORMAT_SPEC = re.compile(r":[<>^=]?[-+ ]?#?0?\d*[,_]?(?:\.\d+)?[a-zA-Z%]?\s*\Z")


def code_literals(source: str) -> list[Number]:
    """Numeric literals of a code cell (not comments, not strings)."""
    lines = [line if not line.lstrip().startswith(("%", "!")) else "" for line in
             source.splitlines()]
    found = []
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        tokens = []
    for tok in tokens:
        if tok.type == tokenize.STRING and re.match(r"[rRbB]?[fF]", tok.string):
            # Python 3.11 tokenizes an f-string as one string: read its {expressions}
            for expr in re.findall(r"\{([^{}]+)\}", tok.string):
                expr = re.sub(_FORMAT_SPEC, "", expr.split("!")[0])
                found.extend(code_literals(expr))
        if tok.type != tokenize.NUMBER or tok.string[-1] in "jJ":
            continue
        text = tok.string.replace("_", "")
        try:
            value = float(int(text, 0)) if re.fullmatch(r"0[xXoObB][\da-fA-F]+", text) else float(text)
        except ValueError:
            continue
        found.append(Number(tok.string, 0, 0, abs(value), 0.0))
    return found


def _output_texts(cell: dict) -> Iterable[str]:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            yield _join(out.get("text", ""))
        for mime in ("text/plain", "text/markdown", "text/html", "text/latex"):
            data = out.get("data", {}).get(mime)
            if data is not None:
                yield re.sub(r"<[^>]+>", " ", _join(data)) if mime == "text/html" else _join(data)


def _join(text: str | list[str]) -> str:
    return text if isinstance(text, str) else "".join(text)


def sources_of(cells: Sequence[dict]) -> Sources:
    src = Sources()
    for cell in cells:
        if cell.get("cell_type") != "code":
            continue
        for text in _output_texts(cell):
            src.printed.extend(numbers(text))
        src.literals.extend(code_literals(_join(cell.get("source", ""))))
    return src


# ----------------------------------------------------------------------------- matching


def _close(v: float, tol: float, w: float) -> bool:
    return abs(v - w) <= tol * (1 + 1e-9) + 1e-12 * max(abs(v), abs(w))


def _matches(n: Number, c: Number, literal: bool) -> bool:
    """Does candidate ``c`` (printed or a code literal) back prose number ``n``?"""
    if n.kind == "ratio":
        if literal:
            return False
        if re.fullmatch(r"\d+", n.text) and n.value <= SMALL_INT_MAX and c.kind != "ratio":
            return False
    tol = max(n.tol, c.tol) if n.is_power else n.tol
    candidates = [c.value]
    if n.kind == "percent":
        candidates.append(c.value * 100)
    elif c.kind == "percent":
        candidates.append(c.value / 100)
    for w in candidates:
        if _close(n.value, tol, w):
            return True
        if any(_close(n.value * s, tol * s, w) for s in n.scales):
            return True
    return False


def is_backed(n: Number, sources: Sources) -> bool:
    return any(_matches(n, c, False) for c in sources.printed) or \
        any(_matches(n, c, True) for c in sources.literals)


def is_cited(n: Number, cited: dict) -> bool:
    for key in cited:
        if str(key).strip() == n.text.strip():
            return True
        if any(_close(n.value, 0.0, k.value) for k in numbers(str(key))):
            return True
    return False


@dataclass
class Unmatched:
    cell: int
    number: str
    sentence: str

    def __str__(self) -> str:
        return f"cell {self.cell}: {self.number!r} in: {self.sentence}"


def sentence_around(text: str, start: int, end: int, width: int = 220) -> str:
    """The sentence (or list item, or heading) of ``text`` that holds ``text[start:end]``."""
    boundary = re.compile(r"(?<=[.!?:;])\s+(?=[A-Z*_(\[`$\"“])|\n\s*\n|\n(?=\s*(?:[-*+]\s|\d+\.\s|#))")
    lo = 0
    for m in boundary.finditer(text, 0, start):
        lo = m.end()
    m = boundary.search(text, end)
    hi = m.start() if m else len(text)
    sentence = " ".join(text[lo:hi].split())
    if len(sentence) > width:
        i = sentence.find(text[start:end])
        i = max(0, i - width // 2)
        sentence = ("…" if i else "") + sentence[i:i + width] + "…"
    return sentence


def unmatched_in_cells(cells: Sequence[dict]) -> list[Unmatched]:
    sources = sources_of(cells)
    result = []
    for index, cell in enumerate(cells):
        if cell.get("cell_type") != "markdown":
            continue
        text = _join(cell.get("source", ""))
        cited = cell.get("metadata", {}).get("cited", {}) or {}
        for n in prose_numbers(text):
            if n.exempt or is_cited(n, cited) or is_backed(n, sources):
                continue
            result.append(Unmatched(index, n.text, sentence_around(text, n.start, n.end)))
    return result


def unmatched_numbers(markdown: str, outputs: Sequence[str] = (), code: Sequence[str] = (),
                      cited: dict | None = None) -> list[str]:
    """The unmatched numbers of one markdown text against given outputs and code (for tests)."""
    cells = [{"cell_type": "code", "source": src, "outputs": []} for src in code]
    cells.append({"cell_type": "code", "source": "",
                  "outputs": [{"output_type": "stream", "name": "stdout", "text": t}
                              for t in outputs]})
    cells.append({"cell_type": "markdown", "source": markdown, "metadata": {"cited": cited or {}}})
    return [u.number for u in unmatched_in_cells(cells)]


def unmatched_in_notebook(path: str | Path) -> list[Unmatched]:
    with open(path, encoding="utf-8") as f:
        return unmatched_in_cells(json.load(f)["cells"])


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__.split("\n\n", 1)[0])
        print("usage: python tests/prose_numbers.py solutions/NN_slug.ipynb [...]")
        return 2
    status = 0
    for path in argv:
        found = unmatched_in_notebook(path)
        for u in found:
            print(f"{path}: {u}")
        if found:
            status = 1
            print(f"{path}: {len(found)} number(s) in prose that no output, code literal or "
                  f'"cited" metadata backs up')
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
