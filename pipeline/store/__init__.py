"""The feature store: a Zarr v3 store of frozen-CLIP tokens written once per shard (`cache`,
`create`, `format`), its checksummed direct reader (`shards`), integrity checks (`integrity`), the
writer lock (`lock`), the training reader (`loader`) and HDF5 export (`export`).

May import `model`, `data`, `config` and below. Knows nothing of how tokens are computed.
"""
