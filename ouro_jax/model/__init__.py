"""Ouro model: config, layers, the looped forward, exit distribution."""
