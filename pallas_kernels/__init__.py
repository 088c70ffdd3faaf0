"""Pallas kernels: written for TPU through Mosaic, run anywhere with interpret=True."""
from .tree_attention import ref_tree_attention as ref_tree_attention
from .tree_attention import tree_attention as tree_attention
