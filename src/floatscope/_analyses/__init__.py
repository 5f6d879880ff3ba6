"""Analyses: one module per phenomenon."""
