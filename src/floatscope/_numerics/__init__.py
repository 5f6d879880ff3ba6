"""Pure numerical helpers: float formats and tensor summaries."""
