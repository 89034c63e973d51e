"""Evaluation tasks built on `jaxlm.scoring` and `jaxlm.generate`: perplexity and bits-per-byte, multiple
choice, HumanEval pass@1 in a sandbox, and the lm-evaluation-harness adapter."""
