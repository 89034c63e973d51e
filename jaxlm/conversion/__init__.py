"""Whole run directories to and from other ecosystems' formats: Hugging Face models and PEFT adapters.
Built on `jaxlm.hf` (the formats) and the run assembly and loader."""
