"""The PyTorch ("torch") kernels: plain PyTorch ops, tuned for CPU threads, valid on any device."""
