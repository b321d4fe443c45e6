"""The base layer: errors, interruption, untrusted-file checks, provenance and the scores every layer uses.

Imports nothing else of `defense` (docs/architecture.md)."""
