"""Multi-device inference: the mesh, Megatron tensor slicing and pipeline stages."""
