"""Fits end to end: ``fit`` (train, evaluate, save) and its ``--dry-run`` plan."""
