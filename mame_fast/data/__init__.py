"""Stage 1: source images -> shards: the real metadata, a faithful sample, where images come from, the on-disk
shard format, and the sharding tool."""
