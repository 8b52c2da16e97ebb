"""The course in a real browser: JupyterLab 4, headless Chromium, working widgets.

A private JupyterLab server, started with `make lab` itself (free localhost port, random
token), serves a temporary folder holding copies of lesson 02 (solution) and the student
version of lesson 01, so nothing is written into the repository; Playwright drives
Debian's Chromium by its path. The tests click through the lab's menus as a learner would:

- `make lab` starts, as root too (CI runs as root), with nbgrader's Validate and without
  its instructor tools, and the server logs no error;
- lesson 02 runs top to bottom (Run → Run All Cells) without an error, and its
  clipping explorer answers a slider move: the printed error and the figure change,
  and the range the kernel reports is the one the slider asked for;
- in the untouched student notebook of lesson 01 one Run All reaches the last cell: the
  checks fail on the stub (the first one says the exercise is not implemented yet) and
  stop nothing, and every cell outside the exercises and their checks runs without an
  error.

Screenshots go to ``artifacts/browser/`` (git-ignored). Without /usr/bin/chromium the
tests are skipped, except on CI (``CI`` set), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from browser_utils import (
    ROOT,
    LabServer,
    clear_all_outputs,
    execution_count,
    jupyter_lab,
    launch_chromium,
    open_notebook,
    require_chromium,
    run_all_and_wait,
    run_and_wait,
    save,
    shows_error,
)
from notebook_utils import errors, grade_id, is_exercise_cell, is_test_cell
from playwright.sync_api import Browser, Page, expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

LESSON = "02_calibration.ipynb"  # the lesson with the clipping explorer (solution version)
STUDENT = "01_affine_map.ipynb"  # a generated student notebook (stubs unsolved)
SOURCES = {LESSON: ROOT / "solutions" / LESSON, STUDENT: ROOT / "notebooks" / STUDENT}
MAY_FAIL_TAG = "raises-exception"  # JupyterLab's Run All goes on past a failing cell with it
ARTIFACTS = ROOT / "artifacts" / "browser"
VIEWPORT = {"width": 1400, "height": 1000}  # the explorer's figure is 1000 px wide
PAGE_MS = 120_000  # loading the lab or starting a kernel on a busy 2-core machine
RUN_MS = 360_000  # a whole lesson (budget 90 s, on a loaded 2-core machine up to ~3x that)
WIDGET_MS = 60_000  # one slider move: the kernel redraws one figure


@pytest.fixture(scope="module")
def chromium() -> Path:
    return require_chromium()


@pytest.fixture(scope="module")
def lab(chromium: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """JupyterLab over a temporary folder with copies of the two notebooks; always stopped."""
    work = tmp_path_factory.mktemp("jupyterlab")
    root = work / "root"
    root.mkdir()
    for name, source in SOURCES.items():
        if source.exists():  # a missing notebook fails its own test, not the other one
            shutil.copyfile(source, root / name)
    with jupyter_lab(root, work) as server:
        yield server


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Browser]:
    with launch_chromium() as browser:
        yield browser


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context; its last view is kept as a screenshot (useful on failure)."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        try:
            page.screenshot(path=ARTIFACTS / f"{request.node.name}-last.png")
        except Exception:  # the page may be gone already; the test's own failure matters more
            pass
        context.close()


@pytest.fixture
def artifacts(capsys: pytest.CaptureFixture[str]) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with capsys.disabled():
        print(f"\nscreenshots in {ARTIFACTS}")
    return ARTIFACTS


def notebook_copy(lab: LabServer, name: str) -> nbformat.NotebookNode:
    path = lab.root_dir / name
    if not path.exists():
        pytest.fail(f"{SOURCES[name].relative_to(ROOT)} is missing")
    return nbformat.read(path, as_version=4)


def number(text: str, pattern: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in {text!r}"
    return float(match.group(1))


def readout_range(text: str) -> tuple[float, float]:
    match = re.search(r"range \[(-?[\d.]+), (-?[\d.]+)\]", text)
    assert match, f"no range in the readout {text!r}"
    return float(match.group(1)), float(match.group(2))


# A server log line at level E (error) or C (critical), e.g. nbgrader's formgrader
# complaining at start-up; the [C] banner that prints the server's address is not one.
LOG_PROBLEM = re.compile(r"^\[(E|C) [^\]]*\] (?!\s*$)(?!received signal)(.*)$", re.MULTILINE)


def server_errors(log: str) -> list[str]:
    """Error and critical lines of a JupyterLab log, and JupyterLab's refusal to run as root."""
    problems = [m.group(0) for m in LOG_PROBLEM.finditer(log)]
    problems += [line for line in log.splitlines() if "Running as root is not recommended" in line]
    return list(dict.fromkeys(problems))


def test_make_lab_starts_with_the_course_settings(lab: LabServer) -> None:
    """`make lab` itself started the server (as root on CI: the Makefile adds --allow-root),
    with nbgrader's Validate for learners and without its instructor tools, and its log
    holds no error."""
    log = lab.log()
    command = log.split("\n[", 1)[0]  # make echoes the recipe it runs before the server logs
    assert "jupyter lab" in command and "--ServerApp.root_dir=" in command, command
    assert ("--allow-root" in command) == (os.geteuid() == 0), (os.geteuid(), command)
    assert "nbgrader.server_extensions.validate_assignment | extension was successfully loaded" in log
    for tool in ("formgrader", "course_list", "assignment_list"):
        assert f"nbgrader.server_extensions.{tool} |" not in log, f"nbgrader's {tool} was loaded"
    assert not server_errors(log), "\n".join(server_errors(log))
    assert lab.api("status")["started"], "the server does not answer"


def test_lesson_02_runs_and_its_explorer_answers_the_slider(
    lab: LabServer, page: Page, artifacts: Path
) -> None:
    source = notebook_copy(lab, LESSON)
    open_notebook(page, lab, LESSON, PAGE_MS)
    # The stored outputs come from nbconvert; what is checked here is the browser's own run.
    clear_all_outputs(page, PAGE_MS)
    states = run_and_wait(page, "Run All Cells", RUN_MS)

    assert len(states) == len(source.cells), "the page shows a different number of cells"
    not_run = [i for i, s in enumerate(states) if s["code"] and execution_count(s) is None]
    assert not not_run, f"cells {not_run} did not run (Run All stops at the first error)"
    failed = [i for i, s in enumerate(states) if shows_error(s)]
    assert not failed, f"cells {failed} show a traceback: " + " | ".join(
        o["text"][-400:] for i in failed for o in states[i]["outputs"]
    )
    # What the browser shows is what the notebook holds: save the temporary copy, read it.
    save(page, PAGE_MS)
    saved = nbformat.read(lab.root_dir / LESSON, as_version=4)
    assert not [i for i, c in enumerate(saved.cells) if c.cell_type == "code" and errors(c)]

    # The clipping explorer (course_lib.widgets.ClippingExplorer) rendered as a live widget.
    output = page.locator(".jp-OutputArea-output").filter(has=page.locator("span.cl-mse-readout"))
    output = output.first
    output.wait_for(timeout=WIDGET_MS)
    slider = output.locator(".widget-slider").filter(
        has=page.get_by_text("clip range", exact=True)
    )
    handle, track = slider.locator(".noUi-handle"), slider.locator(".noUi-base")
    value = slider.locator(".widget-readout")
    readout = output.locator("span.cl-mse-readout")
    image = output.locator("img.widget-image")
    output.scroll_into_view_if_needed()
    image.wait_for(timeout=WIDGET_MS)
    page.screenshot(path=artifacts / "02_explorer_before.png")

    t_before = float(value.inner_text())
    text_before = readout.text_content()
    src_before = image.get_attribute("src")
    pixels_before = image.screenshot()
    lo_before, hi_before = readout_range(text_before)
    assert t_before == pytest.approx(max(-lo_before, hi_before), abs=2e-3), (
        "the explorer starts at min-max: the clip threshold is max|x|"
    )

    # Drag the clip handle to about a third of the track (clip at ±t, t ≈ max|x| / 3).
    box, bar = handle.bounding_box(), track.bounding_box()
    assert box and bar
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(bar["x"] + 0.33 * bar["width"], box["y"] + box["height"] / 2, steps=12)
    page.mouse.up()

    # The kernel answers with a new readout and a new picture.
    # (Queried afresh each time: the HTML widget replaces its span on every update.)
    page.wait_for_function(
        """([out, text, src]) => {
               const span = out.querySelector('span.cl-mse-readout');
               const img = out.querySelector('img.widget-image');
               return span && img && span.textContent !== text && img.src !== src; }""",
        arg=[output.element_handle(), text_before, src_before],
        timeout=WIDGET_MS,
        polling=250,
    )
    page.screenshot(path=artifacts / "02_explorer_after.png")
    image.screenshot(path=artifacts / "02_explorer_figure_after.png")

    t_after = float(value.inner_text())
    text_after = readout.text_content()
    assert 0.2 * t_before < t_after < 0.5 * t_before, (
        f"the slider moved from t = {t_before} to {t_after}, not to about a third"
    )
    # The range the kernel used is the data range clipped at ±t (readout rounds to 3 digits).
    lo, hi = readout_range(text_after)
    assert -t_after - 2e-3 <= lo and hi <= t_after + 2e-3, (lo, hi, t_after)
    assert min(abs(lo + t_after), abs(hi - t_after)) < 2e-3, (lo, hi, t_after)
    # Clipping at a third of max|x| clips values that min-max kept, and costs clipping error.
    clipped = r"clipped ([\d.]+) %"
    assert number(text_after, clipped) > number(text_before, clipped), (text_before, text_after)
    clip_mse = r"clipping ([\d.e+-]+)"
    assert number(text_after, clip_mse) > number(text_before, clip_mse), (text_before, text_after)
    assert image.screenshot() != pixels_before, "the figure's pixels did not change"


def test_student_notebook_runs_to_the_end_past_failing_checks(
    lab: LabServer, page: Page, artifacts: Path
) -> None:
    source = notebook_copy(lab, STUDENT)
    tests = [i for i, c in enumerate(source.cells) if is_test_cell(c)]
    exercises = [i for i, c in enumerate(source.cells) if is_exercise_cell(c)]
    code = [i for i, c in enumerate(source.cells) if c.cell_type == "code"]
    assert tests, f"{STUDENT} has no graded test cell"
    tagged = [i for i, c in enumerate(source.cells) if MAY_FAIL_TAG in c.metadata.get("tags", [])]
    assert tagged == sorted(tests + exercises), (
        f"notebooks/{STUDENT} should tag exactly its exercise and check cells {MAY_FAIL_TAG!r}: "
        "run `make student-notebooks`"
    )
    open_notebook(page, lab, STUDENT, PAGE_MS)

    # nbgrader's Validate button is on the notebook's toolbar; its instructor tools are not.
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    expect(panel.locator(".jp-Toolbar .validate-button")).to_be_visible()
    expect(page.locator(".lm-MenuBar-item").filter(has_text="Nbgrader")).to_have_count(0)
    expect(page.locator("#nbgrader-create_assignemnt")).to_have_count(0)  # nbgrader's spelling

    # One Run All, as a learner stuck on the first exercise would click it: the failing
    # checks (tagged raises-exception) stop nothing, and the last cell runs.
    states = run_all_and_wait(page, RUN_MS)
    assert len(states) == len(source.cells), "the page shows a different number of cells"
    failed = {i for i, s in enumerate(states) if shows_error(s)}
    not_run = [i for i in code if execution_count(states[i]) is None]
    assert not not_run, (
        f"Run All stopped: cells {not_run} never ran (cells with an error: {sorted(failed)})"
    )
    counts = [execution_count(states[i]) for i in code]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), (
        f"Run All ran the cells out of order: {counts}"
    )

    outside = sorted(failed - set(tests) - set(exercises))
    assert not outside, "an unsolved exercise broke later cells: " + " | ".join(
        f"cell {i}: " + "".join(o["text"] for o in states[i]["outputs"])[-300:] for i in outside
    )
    assert failed >= set(tests), f"checks {sorted(set(tests) - failed)} pass on the stub"
    first = tests[0]
    shown = "\n".join(o["text"] for o in states[first]["outputs"])
    assert "not implemented yet" in shown, (
        f"the visible check {grade_id(source.cells[first])} should report the stub; it shows:\n"
        f"{shown[-800:]}"
    )
    cell = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").nth(first)
    # JupyterLab lays out its windowed notebook lazily: scroll, let it settle, scroll again,
    # so that the check's one-line ExerciseError message is on the screenshot.
    output = cell.locator(".jp-OutputArea")
    for _ in range(2):
        output.scroll_into_view_if_needed()
        page.wait_for_timeout(400)
    page.screenshot(path=artifacts / "01_student_check_on_stub.png")

    save(page, PAGE_MS)
    saved = nbformat.read(lab.root_dir / STUDENT, as_version=4)
    with_errors = {i for i, c in enumerate(saved.cells) if c.cell_type == "code" and errors(c)}
    assert with_errors == failed, (sorted(with_errors), sorted(failed))
    assert all(saved.cells[i].execution_count for i in code)
    first_error = errors(saved.cells[first])[0]
    assert first_error.ename == "ExerciseError" and "not implemented yet" in first_error.evalue
    assert not server_errors(lab.log()), lab.log()[-3000:]
