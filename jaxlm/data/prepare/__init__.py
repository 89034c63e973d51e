"""`jaxlm data prepare`: `run` drives the stages (normalize, filters, pii, dedup, decontaminate; `units`
counts words or CJK characters for them) from raw text to tokenized shards and a manifest."""
