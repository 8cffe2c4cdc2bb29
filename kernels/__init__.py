"""Triton kernels, each op a folder with its pure-PyTorch reference beside it.

Ops: contrastive (the tri-modal loss) and attention.
"""
