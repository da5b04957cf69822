"""Air-gap release builder for an RKE2-style Kubernetes distribution."""

__version__ = "0.1.0"
