"""What both front ends (pipelines/, deployments/) share and model/ must not know about: the metrics catalog, the
default checkpoint and its banner, and the environment of a local Ray. Depends on model/ only."""
