"""Tinker's module paths (`tinker.lib.public_interfaces...`) for code that imports from
them; the names live in the tunemesh modules these re-export."""
