"""The application around the compiler: the command line (``cli.py``), the runtime wrapper
(``runtime.py``: :class:`Explainer`), explaining data sets (``explain.py``, ``scale.py`` with Ray),
preprocessing, rendering, evaluation (``evaluate.py``, ``perturbation.py``), the demo and the web page."""
