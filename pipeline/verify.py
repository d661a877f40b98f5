"""`python -m pipeline.verify run_id=X [sink=s3]`: check every committed shard against its commit
marker (files present, row counts, sha256); exits non-zero on any missing, extra or corrupt part.
The command lives in pipeline/outputs/verify.py; this is its short name."""
from pipeline.outputs.verify import main

if __name__ == "__main__":
    main()
