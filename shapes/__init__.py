"""Shapes and host-side numpy: preprocessing, M-RoPE positions and graph I/O shared by export and runtime."""
