"""The one base class for errors meant for users: a single clear sentence, never a traceback."""


class UserError(Exception):
    """An error whose message is written for the person using ResLens."""
