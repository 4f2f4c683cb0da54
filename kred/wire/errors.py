"""The one error of the wire format."""


class WireError(ValueError):
    """A message (Arrow body or shared-memory reference) that is not well formed; the text says what is wrong."""
