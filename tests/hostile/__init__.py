"""Hostile input: a live engine process bombarded over both transports."""
