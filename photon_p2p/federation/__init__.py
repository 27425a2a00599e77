"""Federation seam: DHT networking, compressed pseudo-gradient averaging over hivemind, outer optimizers."""


class FederationError(RuntimeError):
    """A user-facing failure of the federation layer; the message is one line and says what to fix."""
