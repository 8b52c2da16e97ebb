"""Server settings of `make lab` (it puts this folder first on JUPYTER_CONFIG_PATH).

Learners keep nbgrader's Validate button (the validate_assignment extension: it runs a
notebook and reports which checks fail). The instructor's tools stay off: the formgrader
(which logs an error at every start, because the course's nbgrader directory lives in a
temporary folder, outside the lab's root, see nbgrader_config.py), the course list and
the assignment list (which need an nbgrader exchange that this course does not use).
Their lab-side plugins are switched off in labconfig/page_config.json.

Instructors grade with `make grade`; nbgrader's own command line works as before.
"""

c = get_config()  # noqa: F821 (injected by traitlets when Jupyter loads this file)

c.ServerApp.jpserver_extensions.update(
    {
        "nbgrader.server_extensions.formgrader": False,
        "nbgrader.server_extensions.course_list": False,
        "nbgrader.server_extensions.assignment_list": False,
        "nbgrader.server_extensions.validate_assignment": True,
    }
)
