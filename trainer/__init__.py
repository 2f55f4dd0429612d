"""Stillroom: distill a teacher into a small student and compress it while it trains."""
