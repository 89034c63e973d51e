"""The model: layers, attention, the Transformer, LoRA adapters and int8 weight quantization. Imports only `jaxlm.core`."""
