"""The Ollama Modelfile: Mistral-Instruct's prompt as a Go text/template, the stops, the SYSTEM message."""

from .chat import MistralV1, PromptFormat

# Ollama renders a TEMPLATE with Go's text/template and then prepends <s> itself (the GGUF says add_bos_token), so
# the model sees exactly the training ids. A literal <s> here would give two BOS tokens.
#
# v1: `<s>[INST] {system}\n\n{user} [/INST] {answer}</s>[INST] {user2} [/INST]`, the system message in the first user
# turn. The else branch serves Ollama versions without .Messages, which execute the template once per turn with
# .System/.Prompt/.Response.
OLLAMA_TEMPLATE = """{{- if .Messages }}
{{- $system := .System }}
{{- range .Messages }}
{{- if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}

{{ end }}{{ .Content }} [/INST]
{{- $system = "" }}
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}
{{- else }}[INST] {{ if .System }}{{ .System }}

{{ end }}{{ .Prompt }} [/INST]{{ if .Response }} {{ .Response }}</s>{{ end }}
{{- end }}"""

# v2/v3 and Tekken: `<s>[INST]{user}[/INST]{answer}</s>[INST]{system}\n\n{user2}[/INST]`, the system message in the
# last user turn, [INST] and [/INST] control tokens that llama.cpp parses from the text (after a control token a
# SentencePiece model's llama.cpp adds the `▁` that Mistral's per-segment encoding gives). Only Ollama's .Messages
# form is written: the per-turn legacy form cannot know which user turn is the last, and every Ollama that runs
# Mistral v0.3 or Nemo has .Messages.
OLLAMA_CONTROL_TEMPLATE = """{{- $last := -1 }}
{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $last = $i }}{{ end }}{{ end }}
{{- range $i, $m := .Messages }}
{{- if eq $m.Role "user" }}[INST]{{ if and $.System (eq $i $last) }}{{ $.System }}

{{ end }}{{ $m.Content }}[/INST]
{{- else if eq $m.Role "assistant" }}{{ $m.Content }}</s>
{{- end }}
{{- end }}"""


def ollama_template(prompt_format: PromptFormat) -> str:
    """The TEMPLATE that renders `prompt_format`'s training text."""
    return OLLAMA_TEMPLATE if isinstance(prompt_format, MistralV1) else OLLAMA_CONTROL_TEMPLATE


# Ollama's `create` took ADAPTER up to 0.34.0; ollama/ollama#14969 (merged 2026-09-15, in 0.34.1) made it refuse any
# Modelfile holding it, while models created before still run (generative-computing/mellea#1651). Its sources up to
# then (parser/parser.go's "adapter" case, server/create.go's adapter layers) still took it.
ADAPTER_NOTE = """# ADAPTER needs Ollama 0.34.0 or older: from 0.34.1 on, `ollama create` refuses a Modelfile with
# ADAPTER (ollama/ollama#14969); models created before still run. With a newer Ollama, export the merged model instead
# (export_gguf.py without --lora_only: it needs little RAM). adapter.gguf also runs in llama.cpp, with the training
# prompt's template (the base GGUF's own may differ):
#   llama-server -m BASE.gguf --lora {adapter} --jinja --chat-template-file chat_template.jinja
#   python infer.py BASE.gguf --lora {adapter}"""


def modelfile(source: str, system: str | None, adapter: str | None = None, template: str = OLLAMA_TEMPLATE) -> str:
    """Ollama Modelfile: FROM a GGUF or an Ollama model, optionally with a LoRA ADAPTER beside the Modelfile (after a
    comment on which Ollama versions take it); the prompt `template` (ollama_template's), stops on the next turn or end
    of answer, optional SYSTEM."""
    note = ADAPTER_NOTE.format(adapter=adapter).splitlines() if adapter else []
    lines = note + [f"FROM {source}"] + ([f"ADAPTER ./{adapter}"] if adapter else []) + [
        f'TEMPLATE """{template}"""', 'PARAMETER stop "[INST]"', 'PARAMETER stop "</s>"']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
