"""The engine: masked sweeps, channel masks, the per-channel rule, evaluated steps, layer defaults, compact export."""
