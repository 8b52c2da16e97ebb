"""nbgrader settings of the course: one place for the exercise conventions.

`scripts/build_student_notebooks.py` (`make student-notebooks`) and `scripts/grade.py`
(`make grade`) load this file and then point nbgrader at a private temporary course
directory, so nbgrader never writes a gradebook.db, release/ or autograded/ folder into
the repository and never touches solutions/. The same guard holds if someone runs the
`nbgrader` command line from the repository root: the course root below is a folder
in the system's temporary directory, not the repository.
"""

import getpass
import os
import tempfile

c = get_config()  # noqa: F821 (injected by traitlets when nbgrader loads this file)

# Never the repository: a stray `nbgrader ...` run from here writes to a temp folder.
c.CourseDirectory.root = os.path.join(
    tempfile.gettempdir(), f"quant-course-nbgrader-{getpass.getuser()}"
)
c.CourseDirectory.course_id = "quantization-for-edge-devices"

# Solution regions and their stub (CONTRIBUTING.md, "Exercises").
c.ClearSolutions.begin_solution_delimeter = "BEGIN SOLUTION"
c.ClearSolutions.end_solution_delimeter = "END SOLUTION"
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.enforce_metadata = True

# Hidden tests: removed from the student notebook, kept in the gradebook's copy.
c.ClearHiddenTests.begin_test_delimeter = "BEGIN HIDDEN TESTS"
c.ClearHiddenTests.end_test_delimeter = "END HIDDEN TESTS"

# Test cells cannot be edited or deleted in the student notebook.
c.LockCells.lock_grade_cells = True
c.LockCells.lock_solution_cells = True

# Executed solution notebooks carry per-cell timing metadata; the student version must
# not (it would change every time the solution is re-run).
c.ClearOutput.remove_metadata_fields = {"collapsed", "scrolled", "execution"}

# Autograding: every cell gets this many seconds, then the kernel is interrupted, the
# cell is marked CellTimeoutError and the rest of the notebook still runs.
# `scripts/grade.py --timeout` overrides it.
c.Execute.timeout = 60
c.Execute.interrupt_on_timeout = True
# A submission that deleted a locked test cell gets the original test back
# (a test cell whose source was edited is restored by OverwriteCells anyway).
c.OverwriteCells.add_missing_cells = True
