"""Evaluation tasks built on `jaxlm.inference.scoring` and `jaxlm.inference.generate`: perplexity and
bits-per-byte, multiple choice, HumanEval pass@1 in a sandbox, and the lm-evaluation-harness adapter."""
