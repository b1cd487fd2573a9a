"""Figures of certattn (matplotlib); each function returns a :class:`matplotlib.figure.Figure`."""
