"""The one error type of the exporter: what went wrong and what to do, shown by the CLI without a traceback."""


class ExportError(RuntimeError):
    """An export that cannot run or did not verify; nothing was written to the output folder."""
