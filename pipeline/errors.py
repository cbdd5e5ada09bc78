"""User-facing errors: the CLI prints the message (never a traceback) and exits with the code."""


class UserError(Exception):
    """Bad input or environment the user can fix; `exit_code` 2 for usage, 1 for failed work."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
