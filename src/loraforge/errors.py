"""One exception type for mistakes the user can fix: the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input: a message naming the file, row or key and what to do. No traceback unless --debug."""

    exit_code = 2


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages), else its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
