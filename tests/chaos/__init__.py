"""The chaos harness: a real mesh under load while faults are injected; see run.py."""
