"""Self-contained HTML reports (Plotly, embedded: no network needed to view them)."""
