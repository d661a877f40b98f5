"""Running a harvest: the driver (`driver.py`: prepare -> plan -> dispatch -> finalize), its
preflight, the ledger of corpus files and shards, the Ray actors and dispatcher, the per-shard
worker, the manifest and the run summary."""
