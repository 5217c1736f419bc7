"""The chaos suite: `python -m tests.chaos.run --help`."""
