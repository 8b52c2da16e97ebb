"""What in a submission's code looks like an attempt on the grader, for a human to review.

Flags never change a score: the sandbox and the grader-side verdicts are what make
the grade. They point course staff at the few notebooks worth reading by hand.
"""

from __future__ import annotations

import re

import nbformat

# (label, pattern): each label is reported once per cell in which its pattern occurs.
PATTERNS: list[tuple[str, str]] = [
    ("grading module", r"\bgrading\b|\bautograder\b|\bExerciseError\b|check_function"),
    ("code objects", r"__code__|__globals__|__closure__|__builtins__|\bbuiltins\b|FunctionType|CodeType"),
    ("frame inspection", r"_getframe|\bf_back\b|\bf_locals\b|\bf_globals\b|\binspect\b|\btraceback\b|\bgc\b\s*\."),
    ("IPython hooks", r"set_custom_exc|excepthook|showtraceback|get_ipython|\bInteractiveShell\b|_render_traceback_"),
    ("exits", r"os\._exit|\bSystemExit\b|sys\.exit|(?<![\w.])(exit|quit)\(|\bsignal\.|os\.kill"),
    ("module table", r"sys\.modules|importlib|__import__|\breload\("),
    ("file writes", r"\bopen\([^)]*['\"][wax+]|write_text|write_bytes|\bshutil\b|os\.(remove|unlink|rename|replace|chmod|makedirs|mkdir)"),
    ("solutions or tests", r"solutions|\.ipynb|nbgrader"),
    ("processes and native code", r"subprocess|os\.system|os\.popen|\bctypes\b|\bcffi\b|os\.fork|multiprocessing"),
    ("network", r"\bsocket\b|urllib|requests\.|http\."),
    ("dynamic code", r"(?<![\w.])(exec|eval|compile)\("),
    ("endless loop or huge allocation", r"while\s+True\b|\bbytearray\(|itertools\.count"),
    ("torch internals", r"torch\.ops\b|torch\._C\b|_VariableFunctions"),
]
_COMPILED = [(label, re.compile(pattern)) for label, pattern in PATTERNS]


def code_flags(source: str) -> list[str]:
    """The labels of :data:`PATTERNS` that occur in ``source`` (comments included)."""
    return [label for label, pattern in _COMPILED if pattern.search(source)]


def notebook_flags(submitted: nbformat.NotebookNode, original: nbformat.NotebookNode) -> list[str]:
    """``"<cell>: <label>, ..."`` for every code cell the student wrote or changed."""
    original_sources = {c.source for c in original.cells if c.get("cell_type") == "code"}
    found = []
    for index, cell in enumerate(submitted.cells):
        if cell.get("cell_type") != "code" or cell.source in original_sources:
            continue
        labels = code_flags(cell.source)
        if labels:
            name = (cell.get("metadata", {}).get("nbgrader", {}) or {}).get("grade_id") or f"cell {index}"
            found.append(f"{name}: {', '.join(labels)}")
    return found
