"""The course website (`make site`, `make site STUDENT=1`): built offline, viewed offline.

Both editions are built into temporary folders with `scripts/build_site.py`, the way
`make site` runs it, and checked against the notebooks and files of the repository
(never against a copy of what the builder wrote):

- every lesson `solutions/NN_*.ipynb` has a page; the build takes under 2 minutes;
- in headless Chromium (Debian's, driven by Playwright as in test_browser.py), served
  from 127.0.0.1: every page loads without a console error and without a single request
  to another host (all such requests are blocked and counted), shows its lesson's title,
  its figures (when the notebook stores one), and math typeset by the local MathJax,
  reached in one walk from the landing page through the "next lesson" links, in order;
- a crawl of every local link and resource finds no broken one (anchors included);
- the landing page holds the README's measured tables and the set-up command, and lists
  every lesson; each lesson page has its objectives before its first code cell and links
  its student notebook (the same bytes as notebooks/NN_*.ipynb);
- widgets: the explorer shows its stored picture and a note, progress bars their final
  text, no page embeds a widget;
- the student edition shows no solution code (each solution line of solutions/, absent
  from the student notebook, is looked for, and found in the solutions edition), no
  nbgrader solution markers, and neither edition shows hidden-test text.

Screenshots go to ``artifacts/site/`` (git-ignored).
"""

from __future__ import annotations

import functools
import html
import http.server
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
from browser_utils import ROOT, launch_chromium, require_chromium

pytestmark = pytest.mark.slow

BUILD = ROOT / "scripts" / "build_site.py"
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
ARTIFACTS = ROOT / "artifacts" / "site"
BUILD_BUDGET_S = 120.0  # the "under 2 minutes on 2 cores"
VIEWPORT = {"width": 1400, "height": 1000}
PAGE_MS = 60_000
MATH_MS = 30_000  # MathJax typesets a long lesson in a few seconds on a busy machine
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
OBJECTIVES = re.compile(r"after this lesson you can|you will be able to", re.IGNORECASE)
SOLUTION_BLOCK = re.compile(r"### BEGIN SOLUTION\n(.*?)### END SOLUTION", re.S)


# ----------------------------------------------------------------------------- the notebooks


def notebook(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def title_of(nb: nbformat.NotebookNode) -> str:
    first = next(c.source for c in nb.cells if c.cell_type == "markdown")
    return next(line[2:].strip() for line in first.splitlines() if line.startswith("# "))


def has_image(nb: nbformat.NotebookNode) -> bool:
    return any("image/png" in out.get("data", {})
               for c in nb.cells if c.cell_type == "code" for out in c.get("outputs", []))


def has_math(nb: nbformat.NotebookNode) -> bool:
    return any(re.search(r"\$[^$\n]+\$", c.source) for c in nb.cells if c.cell_type == "markdown")


def source_of(edition: str, solution: Path) -> Path:
    return solution if edition == "solutions" else ROOT / "notebooks" / solution.name


QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def plain(text: str) -> str:
    """Whitespace collapsed, and typographic quotes (Sphinx's smartquotes) made plain."""
    return " ".join(text.translate(QUOTES).split())


# ----------------------------------------------------------------------------- built sites


@dataclass
class Site:
    edition: str
    path: Path
    seconds: float
    output: str

    def page(self, name: str) -> Path:
        return self.path / name

    def pages(self) -> list[Path]:
        return sorted(self.path.rglob("*.html"))


def build(edition: str, out: Path) -> Site:
    command = [sys.executable, str(BUILD), "--out", str(out)]
    if edition == "student":
        command.append("--student")
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return Site(edition, out, seconds, done.stdout + done.stderr)


@pytest.fixture(scope="module")
def solutions_site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return build("solutions", tmp_path_factory.mktemp("site") / "solutions")


@pytest.fixture(scope="module")
def student_site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return build("student", tmp_path_factory.mktemp("site") / "student")


@pytest.fixture(scope="module", params=["solutions", "student"])
def site(request: pytest.FixtureRequest) -> Site:
    return request.getfixturevalue(f"{request.param}_site")


class Page(HTMLParser):
    """What a test needs from one HTML file: its text, its ids and its local references."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.ids: set[str] = set()
        self.refs: list[str] = []
        self.classes: list[str] = []
        self._skip = 0
        self.feed(text)
        self.text = "".join(self.parts)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("script", "style"):
            self._skip += 1
        for key in ("id", "name"):
            if values.get(key) and (key == "id" or tag == "a"):
                self.ids.add(values[key] or "")
        for key in ("href", "src"):
            if values.get(key) and tag in ("a", "link", "script", "img", "source"):
                self.refs.append(values[key] or "")
        self.classes.extend((values.get("class") or "").split())

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


@functools.cache
def parsed(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- build and pages


def test_builds_under_budget_and_reports_size(solutions_site: Site, student_site: Site,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    for built in (solutions_site, student_site):
        size = sum(f.stat().st_size for f in built.path.rglob("*") if f.is_file())
        with capsys.disabled():
            print(f"\n{built.edition} site: built in {built.seconds:.1f} s, {size / 1e6:.1f} MB")
        assert built.seconds < BUILD_BUDGET_S, (
            f"the {built.edition} site took {built.seconds:.0f} s to build "
            f"(budget {BUILD_BUDGET_S:.0f} s):\n{built.output}")
        assert "warning" not in built.output.lower(), built.output


def test_every_lesson_has_a_page_in_order(site: Site) -> None:
    assert SOLUTIONS, "no solutions/NN_*.ipynb"
    index = parsed(site.page("index.html"))
    links = [r for r in index.refs if re.fullmatch(r"\d\d_[\w-]+\.html", r)]
    expected = [f"{s.stem}.html" for s in SOLUTIONS]
    assert list(dict.fromkeys(links)) == expected, "the landing page's lesson list"
    for solution in SOLUTIONS:
        page = parsed(site.page(f"{solution.stem}.html"))
        title = title_of(notebook(source_of(site.edition, solution)))
        assert plain(title) in plain(page.text), f"{solution.stem}: title {title!r} not on its page"


def test_objectives_come_before_the_first_code_cell(site: Site) -> None:
    for solution in SOLUTIONS:
        raw = site.page(f"{solution.stem}.html").read_text(encoding="utf-8")
        found = OBJECTIVES.search(raw)
        assert found, f"{solution.stem}: no learning objectives ('After this lesson you can')"
        first_code = raw.find("cell_input")
        assert first_code == -1 or found.start() < first_code, (
            f"{solution.stem}: the objectives are not at the top of the page")


def test_lesson_pages_link_their_student_notebook(site: Site) -> None:
    for solution in SOLUTIONS:
        page = parsed(site.page(f"{solution.stem}.html"))
        downloads = [r for r in page.refs if r.endswith(f"/{solution.name}")]
        assert downloads, f"{solution.stem}: no link to the student notebook {solution.name}"
        target = site.path / urllib.parse.unquote(downloads[0])
        expected = (ROOT / "notebooks" / solution.name).read_bytes()
        assert target.read_bytes() == expected, f"{target} is not notebooks/{solution.name}"
        assert "make lab" in page.text, f"{solution.stem}: no set-up command"
        assert "Binder" in page.text, f"{solution.stem}: no Binder instructions"


def readme_section(heading: str) -> list[str]:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {heading}"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def test_landing_page_has_readme_tables_and_setup(site: Site) -> None:
    text = plain(parsed(site.page("index.html")).text)
    cells = []
    for line in readme_section("Measured"):
        if line.startswith("|") and not re.fullmatch(r"[|\s:-]+", line):
            cells += [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) > 20, "the README's measured tables were not found"
    for cell in cells:
        words = plain(re.sub(r"[`*]", "", cell))
        assert words in text, f"README table cell {cell!r} is not on the landing page"
    assert "make lab" in text
    assert "Who it is for" in text


def test_widgets_show_what_the_notebook_stores(solutions_site: Site) -> None:
    for solution in SOLUTIONS:
        nb = notebook(solution)
        raw = solutions_site.page(f"{solution.stem}.html").read_text(encoding="utf-8")
        assert "widget-view+json" not in raw and "widget-state+json" not in raw
        page = parsed(solutions_site.page(f"{solution.stem}.html"))
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if WIDGET_VIEW in o.get("data", {})]
        pictures = sum("image/png" in o["data"] for o in outputs)
        assert page.classes.count("widget-static-note") == pictures, solution.stem
        state = nb.metadata.get("widgets", {}).get(
            "application/vnd.jupyter.widget-state+json", {}).get("state", {})
        for out in outputs:
            if "image/png" in out["data"]:
                continue
            box = state.get(out["data"][WIDGET_VIEW]["model_id"], {})
            labels = [state[c.removeprefix("IPY_MODEL_")]["state"]["value"]
                      for c in box.get("state", {}).get("children", [])
                      if state.get(c.removeprefix("IPY_MODEL_"), {}).get("model_name") == "HTMLModel"]
            for label in labels:  # the bar's final words, e.g. "QAT W8A8: 100%"
                words = plain(html.unescape(label).replace("\u2007", " "))
                assert words in plain(page.text), f"{solution.stem}: progress text {words!r}"


# ----------------------------------------------------------------------------- what the student edition hides


def solution_lines(solution: Path) -> list[str]:
    """Lines of the solution blocks that the student notebook does not contain anywhere."""
    student = ROOT / "notebooks" / solution.name
    student_text = plain("\n".join(c.source for c in notebook(student).cells))
    lines = []
    for cell in notebook(solution).cells:
        for block in SOLUTION_BLOCK.findall(cell.source):
            for line in block.splitlines():
                line = line.strip()
                if len(line) >= 20 and not line.startswith("#") and plain(line) not in student_text:
                    lines.append(line)
    return lines


def hidden_test_lines(solution: Path) -> list[str]:
    hidden = ROOT / "autograder" / "hidden" / f"{solution.stem}.py"
    if not hidden.exists():
        return []
    shown = plain("\n".join(c.source for c in notebook(solution).cells))
    return [line.strip() for line in hidden.read_text(encoding="utf-8").splitlines()
            if len(line.strip()) >= 30 and not line.strip().startswith(("#", '"""', "from ", "import "))
            and plain(line) not in shown]


def code_text(page: Path) -> str:
    return plain(parsed(page).text)


def test_student_edition_has_no_solution_code(solutions_site: Site, student_site: Site) -> None:
    for solution in SOLUTIONS:
        lines = solution_lines(solution)
        assert lines, f"{solution.stem}: no solution lines found to look for"
        shown = code_text(solutions_site.page(f"{solution.stem}.html"))
        # The search works: the solutions edition shows the lines.
        assert sum(plain(line) in shown for line in lines) >= len(lines) // 2, solution.stem
        hidden = code_text(student_site.page(f"{solution.stem}.html"))
        # A line the student notebook itself states (an exercise's specification, say) is no leak.
        stated = plain(re.sub(r"`", "", " ".join(
            cell.source for cell in nbformat.read(ROOT / "notebooks" / solution.name, as_version=4).cells)))
        leaked = [line for line in lines if plain(line) in hidden and plain(line) not in stated]
        assert not leaked, f"{solution.stem}: solution code in the student site: {leaked[:3]}"
    for path in student_site.path.rglob("*"):
        if path.is_file() and path.suffix in (".html", ".js", ".ipynb", ".txt"):
            text = path.read_text(encoding="utf-8", errors="replace")
            for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS"):
                assert marker not in text, f"{path.relative_to(student_site.path)}: {marker!r}"


def test_no_hidden_test_text(site: Site) -> None:
    for solution in SOLUTIONS:
        lines = hidden_test_lines(solution)
        text = code_text(site.page(f"{solution.stem}.html"))
        leaked = [line for line in lines if plain(line) in text]
        assert not leaked, f"{solution.stem}: hidden-test text on its page: {leaked[:3]}"
        assert "BEGIN HIDDEN TESTS" not in site.page(f"{solution.stem}.html").read_text()


# ----------------------------------------------------------------------------- served from localhost


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # no access log on the test's output
        pass


@pytest.fixture(scope="module")
def served(site: Site) -> Iterator[str]:
    """The site over HTTP on a free 127.0.0.1 port (a thread of this process)."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site.path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


def is_local(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname
    return url.startswith(("data:", "blob:", "about:")) or host in ("127.0.0.1", "localhost")


def test_no_broken_internal_links(site: Site, served: str) -> None:
    """Crawl from the landing page: every local href/src answers 200, every #anchor exists."""
    todo, seen, broken = ["index.html"], set(), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        page = parsed(site.page(name))
        for ref in page.refs:
            parts = urllib.parse.urlsplit(ref)
            if parts.scheme or parts.netloc or ref.startswith(("mailto:", "javascript:")):
                continue
            target = urllib.parse.unquote(parts.path)
            resolved = os.path.normpath(os.path.join(os.path.dirname(name), target)) if target else name
            try:
                with urllib.request.urlopen(served + urllib.parse.quote(resolved), timeout=10) as r:
                    ok = r.status == 200
            except urllib.error.HTTPError:
                ok = False
            if not ok:
                broken.append(f"{name}: {ref}")
                continue
            if resolved.endswith(".html"):
                if parts.fragment and parts.fragment not in parsed(site.page(resolved)).ids:
                    broken.append(f"{name}: {ref} (no such anchor)")
                todo.append(resolved)
    assert len(seen) > len(SOLUTIONS), f"the crawl reached only {sorted(seen)}"
    assert not broken, f"broken internal links in the {site.edition} site: {broken[:10]}"


# ----------------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def chromium() -> Path:
    return require_chromium()


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[object]:
    with launch_chromium() as browser:
        yield browser


@dataclass
class Visit:
    page: object  # playwright Page
    errors: list[str]
    outside: list[str]


@pytest.fixture
def visit(browser) -> Iterator[object]:  # noqa: ANN001
    """Open URLs in a fresh context that blocks, and records, every request to another host."""
    context = browser.new_context(viewport=VIEWPORT)
    record = Visit(context.new_page(), [], [])

    def route(r) -> None:  # noqa: ANN001
        if is_local(r.request.url):
            r.continue_()
        else:
            record.outside.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    record.page.on("console", lambda m: record.errors.append(m.text) if m.type == "error" else None)
    record.page.on("pageerror", lambda e: record.errors.append(f"page error: {e}"))
    try:
        yield record
    finally:
        context.close()


@pytest.mark.browser
def test_pages_load_offline_and_chain_with_titles_figures_and_math(site: Site, served: str,
                                                                  visit: Visit) -> None:
    """One walk through the site the way a reader goes: the landing page, its link to the
    first lesson, then each lesson's "next lesson" link; the last links back home.

    Every page is reached by clicking, so the chain is checked by the same walk that checks
    each page's title, figures and math (loading a long lesson page costs seconds).
    """
    page = visit.page
    page.goto(served + "index.html", wait_until="load", timeout=PAGE_MS)
    assert "Quantization for Edge Devices" in page.locator("h1").first.inner_text()
    page.locator(f"a[href='{SOLUTIONS[0].stem}.html']").first.click()
    for i, solution in enumerate(SOLUTIONS):
        page.wait_for_url(f"**/{solution.stem}.html", timeout=PAGE_MS)
        page.wait_for_load_state("load", timeout=PAGE_MS)
        nb = notebook(source_of(site.edition, solution))
        h1 = plain(page.locator("h1").first.inner_text()).rstrip("#").strip()
        assert h1 == plain(title_of(nb)), f"{solution.stem}: title {h1!r}"
        if has_image(nb):
            images = page.locator(".cell_output img")
            assert images.count() >= 1, f"{solution.stem}: the notebook has a figure, the page none"
            widths = images.evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert all(w > 0 for w in widths), f"{solution.stem}: a figure did not load {widths}"
        if has_math(nb):
            try:
                page.wait_for_selector("mjx-container", timeout=MATH_MS)
            except Exception as e:  # say why: most often MathJax was not reachable
                pytest.fail(f"{solution.stem}: no math typeset within {MATH_MS / 1000:.0f} s "
                            f"({type(e).__name__}); requests to other hosts: {visit.outside[:3]}, "
                            f"console errors: {visit.errors[:3]}")
            assert page.locator("mjx-merror").count() == 0, f"{solution.stem}: a MathJax error"
            typeset = page.locator("mjx-container").count()
            assert typeset >= 1, f"{solution.stem}: no typeset math"
        links = page.locator(".next-lesson a")
        if i + 1 < len(SOLUTIONS):
            assert "Next lesson" in page.locator(".next-lesson").inner_text(), solution.stem
            assert links.first.get_attribute("href") == f"{SOLUTIONS[i + 1].stem}.html", solution.stem
            links.first.click()
        else:
            assert page.locator(".last-lesson").count() == 1
            assert links.first.get_attribute("href") == "index.html"
    assert not visit.outside, f"requests to other hosts: {visit.outside[:5]}"
    assert not visit.errors, f"console errors: {visit.errors[:5]}"


@pytest.mark.browser
def test_screenshots(site: Site, served: str, visit: Visit,
                     capsys: pytest.CaptureFixture[str]) -> None:
    """The landing page and lesson 02's explorer picture, for a person to look at."""
    if site.edition != "solutions":
        pytest.skip("taken once, of the solutions edition")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = visit.page
    page.goto(served + "index.html", wait_until="load", timeout=PAGE_MS)
    page.screenshot(path=ARTIFACTS / "landing.png")
    explorer = [s for s in SOLUTIONS if s.name.startswith("02_")]
    if explorer:
        page.goto(served + f"{explorer[0].stem}.html", wait_until="load", timeout=PAGE_MS)
        note = page.locator(".widget-static-note").first
        note.scroll_into_view_if_needed()
        page.screenshot(path=ARTIFACTS / "lesson02_explorer.png")
    with capsys.disabled():
        print(f"\nsite screenshots in {ARTIFACTS}")
