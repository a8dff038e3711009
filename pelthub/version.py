"""The package version, at the ground so that any layer can record it (cards, pushed READMEs)."""
__version__ = "0.1.0"
