"""Instruments: hooks, dispatch modes and the watch. Every one undoes itself on exit."""
