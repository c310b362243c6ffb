"""Experiments that train several nets with one recipe and report what differs: depth and skips
(`depth.py`), where attention helps (`attention.py`). Resumable runs and report files: `runs.py`."""
