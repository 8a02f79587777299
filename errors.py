"""The client's failures: each is one sentence for the user and the exit status it means.

Raised anywhere in the client (pins, session, chat); only `client.main` catches them,
prints the sentence and returns `exit_code`. No I/O here.
"""

from __future__ import annotations

EXIT_OK, EXIT_LOST, EXIT_USAGE = 0, 1, 2


class ClientError(Exception):
    """A failure told to the user in one sentence; `exit_code` is what main returns."""

    exit_code = EXIT_LOST


class ConnectionLost(ClientError):
    """The connection is gone or unusable: refused, closed, tampered or malformed."""


class ServerFault(ConnectionLost):
    """The server broke the protocol (a record that does not open, a malformed record or
    frame): reconnecting to it would not mend that, so the chat ends."""


class JoinRefused(ClientError):
    """The server answered `join` with an error (§4, §5); `code` says which."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code = code


class NameRefused(JoinRefused):
    """`invalid_name`, `name_taken` or `name_reserved`: another name may do."""


class UsageError(ClientError):
    exit_code = EXIT_USAGE


class TrustError(ClientError):
    """The server's fingerprint does not match its pin, or the pins cannot be read."""

    exit_code = EXIT_USAGE
