"""Running the frozen CLIP once over the images: views per image (`views`, `device_views`),
encoding shards (`encode`), the resumable engine (`engine`) and Dask workers (`distributed`).

May import `store` and below.
"""
