"""tunemesh SDK."""
