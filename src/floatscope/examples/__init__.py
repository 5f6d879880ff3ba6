"""Bundled example training scripts, each with one real numerical bug. ``floatscope demo`` runs them."""
