"""One exception tree for the receiver; each docstring is the message."""


class ReceiverError(Exception):
    """Dnstap receiver error."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or (self.__doc__,)))


class ConfigError(ReceiverError):
    """Invalid configuration."""


class FrameStreamError(ReceiverError):
    """Frame Streams protocol error."""


class FrameTooLarge(FrameStreamError):
    """Frame larger than the configured maximum frame size."""


class ContentTypeMismatch(FrameStreamError):
    """The sender does not offer the protobuf:dnstap.Dnstap content type."""


class UnexpectedFrame(FrameStreamError):
    """A frame arrived that the Frame Streams state machine does not allow here."""
