"""The package version (its own module: what imports it need not import the package)."""

__version__ = "0.1.0"
