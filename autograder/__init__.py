"""The course's grader: hidden tests judged in the grader's process, student code sandboxed.

See autograder/README.md. Nothing here is imported by the lessons, and the student
release (``make release``) leaves this package out.
"""
