"""The one error type of ham-eval's bad input (exit code 2)."""


class EvalError(ValueError):
    """Bad input to ham-eval: a path, an argument, or data that does not fit the model.
    The message names the argument / file and what is wrong."""
