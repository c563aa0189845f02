"""S1-mini inference: Dual-AR text-to-semantic model, codec, engine and servers."""
