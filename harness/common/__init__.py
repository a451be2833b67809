"""Helpers every room may import: the lowest room of harness/ (it imports only the standard library,
torch where a helper needs it, and nothing else of the project's, so trial/, evaluation/, data/, launch/
and bench/ can share one rule without importing each other)."""
