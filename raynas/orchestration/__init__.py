"""Ray adapters: the only place Ray is imported; the library they drive is pure torch."""
