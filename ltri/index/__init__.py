"""Span indexes (FAISS and exact torch backends) for the span memory policy."""
