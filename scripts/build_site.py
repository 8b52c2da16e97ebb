"""Build the course website: static HTML made from the stored notebooks, offline.

    python scripts/build_site.py [--student] [--out DIR]      (make site, make site STUDENT=1)

Sphinx with MyST-NB and sphinx-book-theme (all pip-installed, pinned) renders every lesson
``solutions/NN_*.ipynb`` present as it is stored: prose, math, code, text outputs and
figures; nothing is executed. ``--student`` renders the generated student notebooks
(``notebooks/NN_*.ipynb``: no solutions, no outputs) instead. The site goes to ``DIR``
(default ``_site/``, git-ignored); it views offline too: no page asks the network for
anything (MathJax is a local copy from the ``sphinx-mathjax-offline`` wheel).

What the script adds to the notebooks on their way to the site (the files in the
repository are only read):

- after the lesson's first cell (title and learning objectives) a box with the student
  notebook to download and how to run the lesson locally and on Binder;
- widget outputs become what the notebook stores for them: the stored picture of an
  explorer with a note that the notebook makes it interactive, and a progress bar's
  final text (from the stored widget state) instead of a widget that needs a kernel;
- a "next lesson" link at the end.

The landing page takes what the course is, who it is for, the set-up commands and the
measured tables from README.md (between ``<!-- site:NAME:start/end -->`` markers when
present, otherwise by the section headings), and lists the lessons found.
"""

from __future__ import annotations

import argparse
import copy
import html
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "site"
DEFAULT_OUT = ROOT / "_site"
SITE_MARK = ".course-site"  # marks a folder this script made, so a rebuild may replace it
LESSON_GLOB = "[0-9][0-9]_*.ipynb"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
MATHJAX_DIST = "sphinx-mathjax-offline"  # a wheel that carries MathJax 3's es5 bundles
MATHJAX_FILE = "tex-svg-full.js"  # conf.py's mathjax_path names the same file
OBJECTIVES = re.compile(r"after this lesson you can|you will be able to", re.IGNORECASE)

WIDGET_NOTE = (
    "A static picture of an interactive explorer. In the notebook its sliders and "
    "buttons redraw it live: open the lesson in JupyterLab (see <em>Work through this "
    "lesson</em> at the top of the page) to use them."
)


class SiteError(RuntimeError):
    """A build that cannot go on; the message says what is missing and what to do."""


@dataclass
class Lesson:
    stem: str  # e.g. "02_calibration"
    number: str  # "02"
    source: Path  # the notebook rendered (solution or student version)
    student: Path  # the student notebook offered for download
    title: str
    summary: str
    has_objectives: bool


# ----------------------------------------------------------------------------- README sections


def readme_section(readme: str, name: str, heading: str) -> str:
    """The README text between ``<!-- site:NAME:start -->`` and ``<!-- site:NAME:end -->``,
    or else the section under the ``## `` heading that starts with ``heading`` (up to the
    next ``## `` heading or ``<!-- release:`` marker), heading included."""
    marked = re.search(
        rf"<!--\s*site:{name}:start\s*-->(.*?)<!--\s*site:{name}:end\s*-->", readme, re.S
    )
    if marked:
        return marked.group(1).strip()
    lines = readme.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## ") and line[3:].strip().startswith(heading):
            end = i + 1
            while end < len(lines) and not (
                lines[end].startswith("## ") or lines[end].startswith("<!-- release:")
            ):
                end += 1
            return "\n".join(lines[i:end]).strip()
    raise SiteError(
        f"README.md has no section '## {heading}…' and no <!-- site:{name}:start --> marker: "
        "the landing page takes it from there"
    )


def readme_intro(readme: str) -> str:
    """What the course is and who it is for: the README from below its title to the
    first section (or the ``site:intro`` markers)."""
    marked = re.search(r"<!--\s*site:intro:start\s*-->(.*?)<!--\s*site:intro:end\s*-->", readme, re.S)
    if marked:
        return marked.group(1).strip()
    body = readme.split("\n", 1)[1] if readme.startswith("# ") else readme
    stop = min(
        (m.start() for m in re.finditer(r"^(## |<!-- )", body, re.M)), default=len(body)
    )
    intro = body[:stop].strip()
    if not intro:
        raise SiteError("README.md has no introduction between its title and its first section")
    return intro


def readme_lesson_lines(readme: str) -> dict[str, str]:
    """``{"01": "what you build"}`` from the README's lesson table (may be incomplete)."""
    rows = re.findall(r"^\|\s*(\d\d)\s*\|\s*`[^`]+`\s*\|\s*(.+?)\s*\|\s*$", readme, re.M)
    return dict(rows)


def setup_command_block(setup_section: str) -> str:
    """The first fenced code block of the README's set-up section (``make lab``)."""
    m = re.search(r"```(?:bash|sh|console)?\n(.*?)```", setup_section, re.S)
    if not m:
        raise SiteError("the README's set-up section has no fenced code block with the commands")
    return m.group(1).strip()


def repository_url(readme: str) -> str | None:
    """The repository's public address, if the README names it with
    ``<!-- site:repository https://github.com/OWNER/NAME -->``."""
    m = re.search(r"<!--\s*site:repository\s+(https://github\.com/[\w.-]+/[\w.-]+?)/?\s*-->", readme)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- lessons


def first_markdown(nb: nbformat.NotebookNode) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            return cell.source
    return ""


def lesson_title_and_summary(path: Path, nb: nbformat.NotebookNode) -> tuple[str, str, bool]:
    text = first_markdown(nb)
    title = next((ln[2:].strip() for ln in text.splitlines() if ln.startswith("# ")), None)
    if not title:
        raise SiteError(f"{path.relative_to(ROOT)}: its first markdown cell has no '# ' title")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    prose = next((p for p in paragraphs if not p.startswith(("#", "**", "-", "|"))), "")
    sentence = re.split(r"(?<=[.!?])\s", " ".join(prose.split()), maxsplit=1)[0]
    return title, sentence, OBJECTIVES.search(text) is not None


def find_lessons(student: bool, readme: str) -> list[Lesson]:
    solutions = sorted((ROOT / "solutions").glob(LESSON_GLOB))
    if not solutions:
        raise SiteError("no lessons: solutions/ holds no NN_*.ipynb notebook")
    lines = readme_lesson_lines(readme)
    lessons = []
    for solution in solutions:
        student_nb = ROOT / "notebooks" / solution.name
        if not student_nb.exists():
            raise SiteError(
                f"solutions/{solution.name} has no student version notebooks/{solution.name}: "
                f"generate it first (python scripts/build_student_notebooks.py {solution.stem})"
            )
        source = student_nb if student else solution
        nb = nbformat.read(source, as_version=4)
        title, sentence, has_objectives = lesson_title_and_summary(source, nb)
        number = solution.name[:2]
        lessons.append(Lesson(solution.stem, number, source, student_nb, title,
                              lines.get(number, sentence), has_objectives))
    return lessons


# ----------------------------------------------------------------------------- widgets


def _state_text(model_id: str, state: dict) -> str | None:
    """A tqdm bar's final text from the stored widget state (HBox of HTML, progress, HTML)."""
    box = state.get(model_id)
    if not box or box.get("model_name") != "HBoxModel":
        return None
    parts = []
    for child in box["state"].get("children", []):
        model = state.get(str(child).removeprefix("IPY_MODEL_"))
        if model is None:
            return None
        values = model.get("state", {})
        if model.get("model_name") == "HTMLModel":
            parts.append(html.unescape(re.sub(r"<[^>]+>", "", values.get("value", ""))))
        elif model.get("model_name") in ("FloatProgressModel", "IntProgressModel"):
            value, top = values.get("value") or 0, values.get("max") or 0
            filled = round(10 * value / top) if top else 0
            parts.append("|" + "█" * filled + " " * (10 - filled) + "|")
    text = "".join(parts).replace("\u2007", " ").strip()
    return text or None


def degrade_widgets(nb: nbformat.NotebookNode) -> int:
    """Replace every widget output by what the notebook stores for it; returns how many.

    An output with a stored picture keeps the picture and gets a note that the notebook
    makes it interactive; a progress bar shows its final text from the stored widget state
    (else its text/plain fallback). The widget state leaves the notebook's metadata, so
    no page embeds widget scripts.
    """
    widgets = nb.metadata.pop("widgets", {}) or {}
    state = widgets.get(WIDGET_STATE, {}).get("state", {})
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW not in data:
                outputs.append(out)
                continue
            count += 1
            view = data[WIDGET_VIEW]
            kept = copy.deepcopy(out)
            if "image/png" in data:
                kept["data"] = {k: v for k, v in data.items() if k != WIDGET_VIEW}
                note = nbformat.v4.new_output(
                    "display_data",
                    data={"text/html": f'<p class="widget-static-note">{WIDGET_NOTE}</p>'},
                )
                outputs.extend([kept, note])
                continue
            text = _state_text(view.get("model_id", ""), state) or data.get("text/plain")
            if text:
                kept["data"] = {"text/plain": text}
                outputs.append(kept)
        cell["outputs"] = outputs
    return count


# ----------------------------------------------------------------------------- pages


def run_box(lesson: Lesson, setup_commands: str, repo: str | None) -> str:
    """The markdown cell after the objectives: download, run locally, run on Binder."""
    student_link = f"{{download}}`{lesson.stem}.ipynb <student-notebooks/{lesson.stem}.ipynb>`"
    if repo:
        slug = repo.removeprefix("https://github.com/")
        binder = (
            f"[open it on Binder](https://mybinder.org/v2/gh/{slug}/HEAD"
            f"?labpath=notebooks/{lesson.stem}.ipynb): Binder builds the course's environment "
            "from `environment.yml`, runs `postBuild` (which installs `course_lib`) and opens "
            "the notebook in JupyterLab. The first start takes several minutes."
        )
    else:
        binder = (
            "enter the address of the course's public repository at mybinder.org and open "
            f"`notebooks/{lesson.stem}.ipynb` there: Binder builds the course's environment "
            "from `environment.yml` and runs `postBuild`, which installs `course_lib`. The "
            "first start takes several minutes."
        )
    return "\n".join([
        ":::{admonition} Work through this lesson",
        ":class: tip run-lesson",
        "",
        f"- **Student notebook** (the exercises to fill in, with their checks): {student_link}",
        "- **On your computer** (Linux, Python 3.11 and `make`), in a copy of the course "
        "repository:",
        "",
        "  ```bash",
        *[f"  {line}" for line in setup_commands.splitlines()],
        "  ```",
        "",
        f"  JupyterLab opens on `notebooks/`; open `{lesson.stem}.ipynb` there.",
        f"- **On Binder**: {binder}",
        ":::",
    ])


def next_cell(lessons: list[Lesson], index: int) -> str:
    if index + 1 < len(lessons):
        target = f"{{doc}}`{lessons[index + 1].stem}`"
        return f":::{{container}} next-lesson\n**Next lesson:** {target}\n:::"
    return (":::{container} next-lesson last-lesson\nThis is the last lesson. "
            "Back to the {doc}`course overview <index>`.\n:::")


def lesson_notebook(lessons: list[Lesson], index: int, setup_commands: str,
                    repo: str | None) -> tuple[nbformat.NotebookNode, int]:
    lesson = lessons[index]
    nb = nbformat.read(lesson.source, as_version=4)
    widgets = degrade_widgets(nb)
    first = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"), -1)
    nb.cells.insert(first + 1, nbformat.v4.new_markdown_cell(run_box(lesson, setup_commands, repo)))
    nb.cells.append(nbformat.v4.new_markdown_cell(next_cell(lessons, index)))
    return nb, widgets


def landing_page(readme: str, lessons: list[Lesson], student: bool) -> str:
    setup = readme_section(readme, "setup", "Set up")
    measured = readme_section(readme, "measured", "Measured")
    edition = (
        "This is the **student edition** of the site: the lesson pages show the student "
        "notebooks, with the exercises left to do and no outputs."
        if student else
        "The lesson pages show the **solution notebooks** as they are stored, with their "
        "outputs: every figure and number on them was produced by running the notebook. "
        "Each page links the student notebook, with the exercises left to do."
    )
    items = [f"{i}. {{doc}}`{les.stem}`: {les.summary}" for i, les in enumerate(lessons, 1)]
    return "\n".join([
        "# Quantization for Edge Devices",
        "",
        readme_intro(readme),
        "",
        edition,
        "",
        "## Lessons",
        "",
        *items,
        "",
        "```{toctree}",
        ":hidden:",
        ":maxdepth: 1",
        "",
        *[les.stem for les in lessons],
        "```",
        "",
        setup,
        "",
        measured,
        "",
    ])


# ----------------------------------------------------------------------------- build


def mathjax_source() -> Path:
    try:
        files = importlib.metadata.files(MATHJAX_DIST) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise SiteError(f"the package {MATHJAX_DIST} is not installed (pip install it): it "
                        "carries the local MathJax the site uses") from e
    for f in files:
        if f.name == MATHJAX_FILE:
            return Path(f.locate())
    raise SiteError(f"{MATHJAX_DIST} has no {MATHJAX_FILE}")


def check_out_dir(out: Path) -> None:
    """Refuse to replace a folder this script did not make (never delete a user's files)."""
    if out.exists() and any(out.iterdir()) and not (out / SITE_MARK).exists():
        raise SiteError(f"{out} exists, is not empty and was not made by this script: "
                        "name another --out folder")
    if out.resolve() in (ROOT, *ROOT.parents):
        raise SiteError(f"--out {out} would replace the repository")


def build(out: Path, student: bool, quiet: bool = True) -> dict[str, object]:
    """Build the site into ``out``; returns a summary (lessons, seconds, bytes, warnings)."""
    start = time.perf_counter()
    out = out.resolve()
    check_out_dir(out)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup_commands = setup_command_block(readme_section(readme, "setup", "Set up"))
    repo = repository_url(readme)
    lessons = find_lessons(student, readme)
    with tempfile.TemporaryDirectory(prefix="course-site-") as tmp:
        src, html_dir = Path(tmp) / "src", Path(tmp) / "html"
        (src / "student-notebooks").mkdir(parents=True)
        (src / "index.md").write_text(landing_page(readme, lessons, student), encoding="utf-8")
        widgets = 0
        for i, lesson in enumerate(lessons):
            nb, n = lesson_notebook(lessons, i, setup_commands, repo)
            widgets += n
            nbformat.write(nb, src / f"{lesson.stem}.ipynb")
            shutil.copyfile(lesson.student, src / "student-notebooks" / f"{lesson.stem}.ipynb")
        command = [sys.executable, "-m", "sphinx", "-b", "html", "-c", str(CONF_DIR),
                   "-d", str(Path(tmp) / "doctrees"), "-j", "auto", "--fail-on-warning",
                   "--keep-going", *(["-q"] if quiet else []), str(src), str(html_dir)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SiteError(f"Sphinx failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        mathjax = html_dir / "_static" / "mathjax"
        mathjax.mkdir(parents=True, exist_ok=True)
        source = mathjax_source()
        shutil.copyfile(source, mathjax / MATHJAX_FILE)
        for name in ("LICENSE", "LICENSE.txt"):  # MathJax is Apache-2.0: its licence goes along
            if (source.parent / name).exists():
                shutil.copyfile(source.parent / name, mathjax / "LICENSE")
        (html_dir / ".buildinfo").unlink(missing_ok=True)
        for source_map in (html_dir / "_static").rglob("*.map"):  # the theme's, for its developers
            source_map.unlink()  # (a browser asks for them only with its developer tools open)
        edition = "student" if student else "solutions"
        (html_dir / SITE_MARK).write_text(
            f"{edition} edition, made by scripts/build_site.py (a rebuild replaces this folder)\n")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(html_dir, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {
        "lessons": [les.stem for les in lessons],
        "without_objectives": [les.stem for les in lessons if not les.has_objectives],
        "widget_outputs": widgets,
        "seconds": time.perf_counter() - start,
        "bytes": size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", action="store_true",
                        help="build from the student notebooks (no solutions, no outputs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder, replaced if this script made it (default: _site/)")
    args = parser.parse_args(argv)
    out = args.out
    try:
        summary = build(out, args.student)
    except SiteError as e:
        print(f"build_site: {e}", file=sys.stderr)
        return 1
    edition = "student" if args.student else "solutions"
    print(f"built the {edition} site of {len(summary['lessons'])} lessons into {out} "
          f"in {summary['seconds']:.1f} s; {summary['bytes'] / 1e6:.1f} MB")
    for stem in summary["without_objectives"]:
        print(f"warning: {stem} has no learning objectives in its first cell "
              "('After this lesson you can' / 'You will be able to')", file=sys.stderr)
    print(f"open {out / 'index.html'} in a browser (it needs no network)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
