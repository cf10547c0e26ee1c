"""RestClient and AdminClient at Tinker's `tinker.lib.public_interfaces.rest_client` path."""

from tunemesh.rest_client import AdminClient, RestClient

__all__ = ["AdminClient", "RestClient"]
