"""Neural-network machinery the generators share: blocks, heads, decoding, training, checkpoints, data and device."""
