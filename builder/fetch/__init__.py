"""Fetch: every input of the lock into the content store (files over HTTP(S), images from
registries or a Docker-API daemon), and the transport under it."""
