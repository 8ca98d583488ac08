"""Elastic supernets (pure torch) and their on-disk format."""

from raynas.supernet.checkpoint import load_supernet, load_supernet_tokenizer, save_supernet
from raynas.supernet.supernet import Supernet, SupernetConfig, SupernetOutput, SupernetState

__all__ = ["Supernet", "SupernetConfig", "SupernetOutput", "SupernetState", "load_supernet", "load_supernet_tokenizer", "save_supernet"]
