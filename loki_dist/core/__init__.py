"""What every stage stands on: model families and loading (whole or straight into ZeRO-3 shards),
process groups, DeepSpeed configs, the positions file, data sharding over ranks, the one atomic file
writer, user errors, `--config` files, and the metering behind the scale tests."""
