"""Hugging Face interop: `families` (config and tensor maps), `tensors` (safetensors files), `importer`,
`exporter` and `tokenizer` (tokenizer files and chat templates in run directories)."""
