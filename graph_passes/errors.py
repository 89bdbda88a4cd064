"""Exceptions raised by the graph passes."""


class GraphRewriteError(RuntimeError):
    """The passes could not rewrite the model as required (e.g. an attention layer whose pattern was not found).

    Raised at the first call of a ``PagedModel`` (when Dynamo compiles it); the message names the model class and
    the pattern that was missing. cinfer never falls back to eager attention silently.
    """
