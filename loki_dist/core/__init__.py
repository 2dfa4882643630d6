"""What every stage stands on: model families and loading (whole or straight into ZeRO-3 shards),
process groups and the collectives that move statistics, DeepSpeed configs, shared flags and `--config`
files, the positions file, data sharding over ranks, the one atomic file writer and the checks before any
work, user errors, and the metering behind the scale tests."""
