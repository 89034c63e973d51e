"""Inference: loading a trained run (`load`), sampling (`generate`) and log-likelihood scoring (`scoring`)."""
