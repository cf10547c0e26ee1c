"""tunemesh local."""
