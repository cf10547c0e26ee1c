"""tunemesh trainer."""
