"""Bridges from other libraries' models to attnzoo mechanisms (``interop.timm``: ``attnzoo.swap`` for timm models).

This layer sits above ``mechanisms`` and beside ``models``; only the package face imports it, on first use, so
importing attnzoo never imports timm.
"""
