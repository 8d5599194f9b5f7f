"""The one exception type users see for bad input or configuration."""


class AudioLLMError(ValueError):
    """A problem the user can fix: the message names the input and what to change."""
