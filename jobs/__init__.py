"""Offline JSONL scoring jobs: the local resumable job and its Ray Data fan-out. Stand on `scoring`."""
