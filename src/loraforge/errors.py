"""One exception type for mistakes the user can fix: the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input: a message naming the file, row or key and what to do. No traceback unless --debug."""

    exit_code = 2
