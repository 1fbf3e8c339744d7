"""SIGTERM as an exception, so every ``finally`` (temporary files, job state) runs: shared by the
command line (cli.py) and the streaming explain (explain.py)."""


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so every ``finally`` (temporary files) runs."""


def on_sigterm(signum, frame):
    raise Terminated()
