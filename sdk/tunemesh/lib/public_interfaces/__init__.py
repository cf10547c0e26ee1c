"""The clients and the future, where Tinker's `tinker.lib.public_interfaces` keeps them."""

from tunemesh.client import ServiceClient
from tunemesh.futures import APIFuture
from tunemesh.rest_client import AdminClient, RestClient
from tunemesh.sampling_client import SamplingClient
from tunemesh.training_client import TrainingClient

__all__ = ["APIFuture", "AdminClient", "RestClient", "SamplingClient", "ServiceClient", "TrainingClient"]
