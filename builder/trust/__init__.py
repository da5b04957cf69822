"""Trust: checksum files, signatures, provenance, upstream image signatures, and the offline
verification of a release directory."""
