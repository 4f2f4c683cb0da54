"""The engine's exception types: every user mistake raises a subclass of KredError."""


class KredError(Exception):
    """Base of every error the engine raises on purpose."""


class FormulaError(KredError, ValueError):
    """The formula text or its dimensions are wrong. `column` is 1-based when known."""

    def __init__(self, message: str, text: str | None = None, column: int | None = None):
        self.text, self.column = text, column
        if text is not None and column is not None:
            caret = " " * (column - 1) + "^"
            message = f"{message} (column {column})\n  {text}\n  {caret}"
        super().__init__(message)


class DimensionError(FormulaError):
    """Operand dimensions do not fit an op."""


class ArgumentError(KredError, ValueError):
    """The arrays given to a reduction do not match its aliases."""


class BackendError(KredError, RuntimeError):
    """A backend is missing, or failed to build or run a kernel."""
