"""Interop with PyTorch / Hugging Face: the modeling code shipped inside every Hugging Face export."""
