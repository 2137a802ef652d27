"""The package version, in a module of its own: every layer may read it (``from tqc.version import
__version__``), while ``tqc`` itself, the public API, sits above the layers."""

__version__ = "0.1.0"
