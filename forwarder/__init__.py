"""forwarder: tail logs, normalize them to one schema, write them to PostgreSQL exactly once."""

__version__ = "0.1.0"
