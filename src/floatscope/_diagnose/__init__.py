"""Interpretation: origin events, run records and optimizer state turned into diagnoses and findings."""
