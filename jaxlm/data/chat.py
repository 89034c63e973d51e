"""Chat templates: render a list of {"role", "content"} messages to text with a model's jinja template.

Templates come from model files (Hugging Face `tokenizer_config.json`'s "chat_template", or a .jinja file),
so they are untrusted input: they run in jinja2's immutable sandbox, with the same conventions as
`transformers` (trim_blocks, lstrip_blocks, `raise_exception`, `bos_token`/`eos_token` variables).

    template = chat.Template(chat.CHATML)
    text = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""

from __future__ import annotations

import json
import os

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxlm.core import rundir
from jaxlm.core.config import ConfigError

# The default when a model brings no template: ChatML (Qwen's format), which tokenizes with any vocabulary.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STOP_STRING = {CHATML: "<|im_end|>"}


class TemplateError(ValueError):
    """A template that fails to render these messages (syntax error, sandbox violation, raise_exception)."""


def _raise(message: str):
    raise TemplateError(message)


class Template:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", prefix_ids: tuple[int, ...] = ()):
        """`prefix_ids`: token ids put before every rendered conversation (a sentencepiece BOS, say)."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None
        self.source = source
        self.special = {"bos_token": bos_token, "eos_token": eos_token}
        self.prefix_ids = tuple(prefix_ids)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text. Raises TemplateError if the template cannot render it."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise TemplateError(f"{type(e).__name__}: {e}") from None

    @property
    def stop_string(self) -> str | None:
        """The end-of-turn text to stop generation at, when known."""
        return STOP_STRING.get(self.source) or self.special["eos_token"] or None


def load(path: str = "", model_dir: str = "", **special) -> Template:
    """The template in `path` (a .jinja file), else the one in `model_dir`'s tokenizer_config.json or
    chat_template.jinja (Hugging Face layout), else ChatML."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return Template(f.read(), **special)
        except OSError as e:
            raise ConfigError(f"cannot read finetune.chat_template {path}: {e.strerror}") from None
    if model_dir:
        jinja_file = os.path.join(model_dir, rundir.CHAT_TEMPLATE)
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                return Template(f.read(), **special)
        config_file = os.path.join(model_dir, rundir.TOKENIZER_CONFIG)
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                tc = json.load(f)
            source = tc.get("chat_template")
            if isinstance(source, list):  # several named templates: take the default one
                source = next((t["template"] for t in source if t.get("name") == "default"), None)
            if isinstance(source, str):
                tokens = {k: _token_text(tc.get(k)) for k in ("bos_token", "eos_token")}
                return Template(source, **{**tokens, **special})
    return Template(CHATML, **special)


def _token_text(token) -> str:
    if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return token.get("content", "")
    return token or ""
