"""The weights layer: PyTorch/safetensors files and Orbax folders ↔ our sharded parameters, for every component."""
