"""The one exception type users see: a message that says what is wrong and what to do."""


class UNetSegError(Exception):
    """An error the user can fix (bad input, unknown model, tampered weights, ...).

    The command line prints ``str(error)`` on one line and exits non-zero; the Slicer module shows it
    in a message box. Programming errors are not wrapped in this type.
    """


class CancelledError(UNetSegError):
    """Raised inside the engine when the caller's ``cancel`` callable returns True."""

    def __init__(self, message: str = "Segmentation was cancelled.") -> None:
        super().__init__(message)
