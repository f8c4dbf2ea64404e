"""Training: trainable sets, initialisation from converted bundles, the diffusion objective, the optimizer
and the compiled train step. Sits above models/; sampling/ never imports it."""
