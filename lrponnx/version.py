"""The package version, in a module of its own: the compiler and the runtime record it without
importing the package's public facade (``lrponnx/__init__.py`` imports them lazily)."""
__version__ = "0.1.0"
