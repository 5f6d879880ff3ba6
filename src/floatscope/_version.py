"""The package version, in one place (the SARIF log and the CLI read it)."""

__version__ = "0.1.0"
