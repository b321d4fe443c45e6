"""The embedded backdoor scenarios: `build` (the cache and the builder), `common` (what the attacks share)
and `attacks/` (one module per attack, found by name)."""
