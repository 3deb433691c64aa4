"""The one error type Ember raises at its boundaries.

Anything a user can get wrong (a spec field, a path, an input line, a request) surfaces as an ``EmberError`` whose
message names what is wrong and where. The CLI prints it as one line and exits non-zero.
"""


class EmberError(Exception):
    """A user-facing failure with a message that names the file, field, line or request at fault."""
