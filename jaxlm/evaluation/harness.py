"""lm-evaluation-harness adapter: evaluates a jaxlm checkpoint with any harness task, no conversion.

    python -m jaxlm.evaluation.harness run --model jaxlm --model_args run_dir=RUN[,quantize=int8] --tasks TASKS

takes the same arguments as the `lm_eval` command (this module registers the model name "jaxlm" first;
`import jaxlm.evaluation.harness` does the same for `lm_eval.simple_evaluate`). Every request goes through
jaxlm's own scorer and generator, so the harness's numbers are jaxlm's numbers.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from jaxlm.inference.generate import Generator, SamplingConfig, complete
from jaxlm.inference.scoring import Scorer, encode_pair


@register_model("jaxlm")
class JaxlmLM(LM):
    def __init__(self, run_dir: str | None = None, step: int | None = None, quantize: str | None = None,
                 batch_size: int | str = 8, max_gen_toks: int = 256, loaded=None, **_unused):
        """Loads `run_dir` (or takes an already loaded `jaxlm.inference.load.LoadedRun` as `loaded`)."""
        super().__init__()
        if loaded is None:
            from jaxlm.inference.load import load_run

            loaded = load_run(run_dir, None if step is None else int(step), quantize=quantize or None)
        self.run = loaded
        self.batch_size = 8 if batch_size in ("auto", None) else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = Scorer(loaded.model, loaded.params, self.batch_size)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.run.tokenizer, context, continuation)
                 for context, continuation in (r.args for r in requests)]
        return [(s.logprob, s.is_greedy) for s in self.scorer.loglikelihood(pairs)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        tok = self.run.tokenizer
        return [self.scorer.rolling([tok.bos_id(), *tok.encode(text)]).logprob for (text,) in (r.args for r in requests)]

    def generate_until(self, requests) -> list[str]:
        """Requests with the same generation settings are decoded together, greedily unless they sample."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kwargs = dict(r.args[1])
            until = kwargs.pop("until", None) or []
            until = (until,) if isinstance(until, str) else tuple(until)
            sampling = SamplingConfig(
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                top_p=float(kwargs.get("top_p", 1.0)), top_k=int(kwargs.get("top_k", 0) or 0),
                max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
            )
            groups.setdefault((sampling, until), []).append(i)
        for (sampling, until), members in groups.items():
            generator = Generator(self.run.model, self.run.params, sampling, self.run.mesh)
            texts = [requests[i].args[0] for i in members]
            completions = complete(generator, self.run.tokenizer, texts, until, self.batch_size, truncate=True)
            for i, text in zip(members, completions):
                results[i] = text
        return results


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
