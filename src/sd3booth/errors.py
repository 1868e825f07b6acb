"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user: what is wrong, where (file, line), and what to do.

    Raised anywhere; caught only by the CLI, which prints ``error: <message>`` and exits with code 2
    without a traceback. Raise it before anything is written, so nothing cached or saved is lost.
    """
