"""`python -m pipeline` / `sae-harvest`: the Hydra app.

    python -m pipeline                                # experiment=demo on the embedded default
    python -m pipeline run_id=nightly corpus=files 'corpus.paths=[s3://bucket/web/*.jsonl]' sink=s3
    python -m pipeline --cfg job                      # print the resolved config
"""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pipeline.config import RunConfig

ConfigStore.instance().store(name="run_schema", node=RunConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def app(dcfg: DictConfig) -> None:
    from pipeline.run import run

    cfg: RunConfig = OmegaConf.to_object(dcfg)
    summary = run(cfg)
    print(summary.describe(), flush=True)
    if cfg.demo is not None and summary.hookpoints:
        from pipeline.demo import show_top_contexts

        show_top_contexts(cfg)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
