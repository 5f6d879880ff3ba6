"""Engines: the orchestrators (watch, locate, precision, compare, determinism) built on the layers below."""
