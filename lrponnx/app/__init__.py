"""The application around the compiler: the command line (``cli.py``), the runtime wrapper
(``runtime.py``: :class:`Explainer`), explaining data sets (``explain.py``: the
command, ``explain_chunks.py``, ``explain_job.py``: its resumable output folder, ``scale.py`` with Ray),
preprocessing, rendering, evaluation (``evaluate.py``, ``perturbation.py``), the demo and the web page."""
