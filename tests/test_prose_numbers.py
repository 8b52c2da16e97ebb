"""Numbers in a lesson's prose come from its outputs (or a cited source): tests/prose_numbers.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prose_numbers import prose_numbers, unmatched_in_notebook, unmatched_numbers

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_every_number_in_the_prose_is_printed_or_cited(path: Path) -> None:
    unmatched = unmatched_in_notebook(path)
    assert not unmatched, (
        f"{len(unmatched)} number(s) in {path.name}'s markdown match no output, no code literal "
        'and no "cited" entry of their cell (see tests/prose_numbers.py):\n'
        + "\n".join(f"  {u}" for u in unmatched)
    )


# ------------------------------------------------------------------ the matcher itself


def test_a_number_absent_from_the_outputs_is_caught() -> None:
    assert unmatched_numbers("Accuracy is 0.984.", ["acc 0.981"]) == ["0.984"]
    assert unmatched_numbers("The file has 20,896 bytes.", ["20,986 bytes"]) == ["20,896"]


def test_a_number_in_the_outputs_passes() -> None:
    assert unmatched_numbers("Accuracy is 0.984 and the file 20,896 bytes.",
                             ["acc 0.984", "size 20,896 B"]) == []


def test_a_cited_number_passes_and_citation_is_per_number() -> None:
    text = "The paper reports 62 % top-1 after 90 epochs."
    assert unmatched_numbers(text, []) == ["62", "90"]
    assert unmatched_numbers(text, [], cited={"62 %": "Krishnamoorthi 2018, Table 3"}) == ["90"]
    assert unmatched_numbers(text, [], cited={"62": "paper", "90": "paper"}) == []


@pytest.mark.parametrize(("prose", "printed"), [
    ("1,031,744 MACs", "1031744"),               # thousands separator in the prose
    ("1031744 MACs", "1,031,744"),               # ... or in the output
    ("0.50 of the maximum", "0.5"),              # trailing zeros
    ("0.5 of the maximum", "0.500"),
    ("12.5 ms", "12.53"),                        # a longer printed value, rounded
    ("about 25 ms", "25.06"),
    ("98.4 %", "0.984"),                         # percent vs fraction
    ("98.4 %", "0.98437"),
    ("98.4 %", "98.4%"),
    ("0.984 accuracy", "98.4 %"),
    ("3.05× smaller", "3.05x"),                  # ratios
    ("about 3× smaller", "ratio 3.05×"),
    ("2.96× smaller", "2.96"),
    ("6·10^7 MACs", "60,000,000"),               # scientific notation
    ("6 × 10⁷ MACs", "6.0e+07"),
    ("2.77·10<sup>−4</sup>", "0.000277"),
    ("eps 1e-4", "0.0001"),
    ("a step of 2**-32", "2.3283e-10"),
    ("a step of 2⁻³²", "2.3283064365386963e-10"),
    ("7.0 million MACs", "7,001,856"),           # multiplier words
    ("2.8 MB", "2,764,872"),
    ("zero point −128", "-128"),                 # signs are ignored
])
def test_formatting_variants_match(prose: str, printed: str) -> None:
    assert unmatched_numbers(prose, [printed]) == []


@pytest.mark.parametrize(("prose", "printed"), [
    ("12.53 ms", "12.5"),            # more digits than printed
    ("98.5 %", "0.984"),
    ("about 2× faster", "0.61× the speed, 2 threads"),  # an integer ratio needs a printed ratio
    ("6·10^7 MACs", "70,000,000"),
    ("2.9 MB", "2,764,872"),
])
def test_near_misses_are_caught(prose: str, printed: str) -> None:
    assert unmatched_numbers(prose, [printed]) != []


def test_code_literals_back_plain_numbers_but_not_ratios() -> None:
    code = ["BATCH = 100\nEFFICIENCY = 0.25  # of peak\nSPEEDUP = 3  # comment 17"]
    assert unmatched_numbers("batches of 100 at 25 % of peak", [], code) == []
    assert unmatched_numbers("INT8 was 3× faster", [], code) == ["3"]
    assert unmatched_numbers("17 images", [], code) == ["17"]  # comments are not code


@pytest.mark.parametrize("prose", [
    "MobileNetV2 on a Cortex-A72 with INT8 and ReLU6, fp32 vs x86, see Table 3.",
    "Lessons 03 and 05 explain sections 12–14; exercise 11, step 13 of version 2.14.",
    "`x = 1234.5` and $s = 4/127.5 \\approx 0.031$ and $$2^{31} - 1$$",
    "## 12. A heading\n\n11. an item",
    "8, 4 and 3 bits, a 12-bit ADC, 16-bit or 32 bits, int8 spans −128 … 127 and 0 … 255.",
    "two 3×3 convolutions on 1×28×28 and 224×224 inputs",
    "(Jacob et al., 2018) and Krishnamoorthi et al. 2018",
    "**Expected time:** 60–75 minutes.",
    "see [the paper](https://arxiv.org/abs/1712.05877) and <img width=\"400\">",
    "`torchao` 0.18 and Python 3.11",
])
def test_exempt_numbers(prose: str) -> None:
    assert unmatched_numbers(prose, []) == [], [(n.text, n.exempt) for n in prose_numbers(prose)]


def test_exemptions_do_not_hide_quantities() -> None:
    prose = "17 images, 2× faster, 12.5 ms, 2018 images, the 99.99th percentile, 3.5 bits"
    assert unmatched_numbers(prose, []) == ["17", "2", "12.5", "2018", "99.99", "3.5"]


def test_the_command_line_reports_cell_and_sentence_and_fails(tmp_path: Path) -> None:
    notebook = {
        "cells": [
            {"cell_type": "code", "source": "print(0.61)", "metadata": {}, "execution_count": 1,
             "outputs": [{"output_type": "stream", "name": "stdout", "text": "0.61\n"}]},
            {"cell_type": "markdown", "metadata": {},
             "source": "INT8 ran 0.61× the speed. It was about 2× faster."},
        ],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5,
    }
    path = tmp_path / "lesson.ipynb"
    path.write_text(json.dumps(notebook))
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "prose_numbers.py"), str(path)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 1
    assert "cell 1: '2' in: It was about 2× faster." in run.stdout

    notebook["cells"][1]["metadata"]["cited"] = {"2×": "a benchmark"}
    path.write_text(json.dumps(notebook))
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "prose_numbers.py"), str(path)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout
