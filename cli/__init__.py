"""The `infimm-hd` command: model commands, plus `batch` (pipelines/), `serve` (deployments/), `train` (training/)."""
