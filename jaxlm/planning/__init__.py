"""`jaxlm plan`: what a config needs (parameters, FLOPs, memory per device) before anything runs."""
