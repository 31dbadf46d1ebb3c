"""Models: loading (hub id, local folder, embedded GGUF), the one architecture table, heads,
quantization (NF4/NF2/uniform) and loading in 4 bits, and the causal LM loss at loss positions."""
