"""vitrine's model room: catalog reading, LMDB shards, image decoding, networks, training, the Embedder."""
