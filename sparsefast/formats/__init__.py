"""Packed sparse weight formats shared by the kernel backends."""
