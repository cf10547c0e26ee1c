"""tunemesh scheduler."""
