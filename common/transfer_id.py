"""The name an encoder knows one attempt of one request by: `TransferId`.

A client's `request_id` is unique only to its client, and a request may fail over to another
encoder and run again. A language instance therefore names each attempt on the encoder as
`LANGUAGE_ID/REQUEST_ID` for the first attempt and `LANGUAGE_ID/REQUEST_ID#N` for the N-th:
unique per language instance by construction, so two instances can use the same request id on
one encoder, and no caller can create a transfer under another instance's prefix (the encoder
checks the prefix against the languages the caller registered).

The language keeps its own tables by `key` (the request id, with `#N` from the second attempt
on); the wire carries `str(transfer_id)`. This module is the only place that builds or reads the
format.
"""

from __future__ import annotations

import dataclasses

SEPARATOR = "/"
ATTEMPT_MARK = "#"


@dataclasses.dataclass(frozen=True)
class TransferId:
    """One attempt of one request of one language instance."""

    language_id: str
    """The language instance that owns the transfer (its Register's `language_id`)."""

    request_id: str
    """The client's request id."""

    attempt: int = 1
    """1 for the first encoder tried; higher after a failover."""

    @property
    def key(self) -> str:
        """The language's name for this attempt: its admission and table key."""
        return (
            self.request_id
            if self.attempt == 1
            else f"{self.request_id}{ATTEMPT_MARK}{self.attempt}"
        )

    def __str__(self) -> str:
        return wire_name(self.language_id, self.key)

    @staticmethod
    def language_of(text: str) -> str | None:
        """The language prefix of a transfer id as sent on the wire; None for an id without one
        (a caller that names its transfers itself, such as a rank driven by hand)."""
        language_id, separator, _ = text.partition(SEPARATOR)
        return language_id if separator else None


def wire_name(language_id: str, key: str) -> str:
    """The transfer id on the wire of the attempt a language knows by `key` (`TransferId.key`):
    the other ranks of an instance learn only the key of an admission."""
    return f"{language_id}{SEPARATOR}{key}"
