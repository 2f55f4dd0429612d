"""Where tensors live: launch detection, process groups and (later) device meshes and wrappers."""
