"""Tokenized-corpus preparation and the packed, resumable, rank-aware training stream."""
