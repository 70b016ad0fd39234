"""Model store, GGUF import, and the MLX generation engine and worker process."""
