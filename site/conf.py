"""Sphinx configuration of the course website.

`scripts/build_site.py` writes the pages (the landing page and one page per lesson,
made from the stored notebooks) into a temporary source folder and runs Sphinx with
this folder as its configuration directory (`-c site`). Nothing here fetches anything:
the theme is a pip-installed package, notebooks are never executed, and MathJax is a
local copy that the build script puts under `_static/mathjax/`.
"""

from __future__ import annotations

project = "Quantization for Edge Devices"
author = "the course authors"
copyright = "the course authors. Code: MIT; MNIST subset: CC BY-SA 3.0"

extensions = ["myst_nb"]  # brings myst_parser; sphinx.ext.mathjax is on for HTML builds

# The student notebooks offered for download sit in the source folder but are not pages.
exclude_patterns = ["student-notebooks", "**.ipynb_checkpoints"]

# --- notebooks: rendered as stored, never executed ---------------------------------------
nb_execution_mode = "off"
# No ipywidgets embed scripts (they would load require.js and the widget manager from a
# CDN): the build script replaces widget outputs by the picture or text they store.
nb_ipywidgets_js: dict[str, dict[str, str]] = {}
nb_merge_streams = True  # one block per cell for stdout (stderr stays apart)

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# --- math: a local MathJax 3 (tex-svg-full: one file, SVG glyphs, every TeX extension
# built in, so the browser never asks for a font or a component) ----------------------------
mathjax_path = "mathjax/tex-svg-full.js"  # relative to _static/

# --- HTML ----------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = project
html_static_path = ["static"]
html_favicon = "static/favicon.svg"  # else browsers ask for /favicon.ico (a 404 in the console)
# Light mode by default: the figures are drawn on white (the reader can still switch).
html_context = {"default_mode": "light"}
html_css_files = ["course.css"]
html_copy_source = False  # no _sources/ copies of the notebooks
html_show_sourcelink = False
html_last_updated_fmt = None
html_theme_options = {
    "home_page_in_toc": True,
    "show_toc_level": 2,
    "use_download_button": False,  # each lesson page links its student notebook instead
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "navigation_with_keys": False,
}
