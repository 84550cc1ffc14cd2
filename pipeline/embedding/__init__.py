"""The embed stage: shards in, one committed Parquet file per shard out (runner, worker, engines, reader)."""
