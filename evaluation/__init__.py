"""The harness: datasets, backbones, feature cache, training and reports for comparing lossbank losses."""
