"""Errors a user can fix. The CLI prints them as plain lines, never as tracebacks."""


class UserError(Exception):
    """A mistake the user can fix; printed as one line per problem, without a traceback."""
