"""The detection math the defenses share, free of Flower: heat maps (LayerCAM, Grad-CAM), the
autoencoder's reconstruction errors, per-round thresholds, voting, evidence over rounds, the
views of the updates, robust aggregation kernels and FAA-DL's verification. Pure
functions on tensors and arrays; the defenses in ``strategies`` are the Flower glue around them."""
