"""Publish: an OCI release, a GitHub release, pull-release, and the merge of per-arch shards."""
