"""The package version, in a leaf module: formats stamp it into exports without importing anything above them."""

__version__ = "0.1.0"
