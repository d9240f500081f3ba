"""Kernels by device, behind one interface the layers call.

``pxcompile.kernels.cpu``: plain PyTorch ops (optionally fused by ``torch.compile``), tuned for
CPU threads; they run on any device.
"""
