"""The bottom layer: parameter declarations and their errors, name registries, caches.

Streams, models, strategies and experiments all import it; it imports none of them.
"""
