"""Exceptions the CLI maps to exit codes: a UserError is a bad input or option, reported without a traceback."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and how to fix it."""


class ShardFailed(Exception):
    """One input shard could not be processed; carries the shard url for the summary."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason
