"""The Ollama Modelfile: Mistral-Instruct's prompt as a Go text/template, the stops, the SYSTEM message."""

# Ollama renders this with Go's text/template and then prepends <s> itself (the GGUF says add_bos_token), so the
# model sees exactly the training ids: `<s>[INST] {system}\n\n{user} [/INST] {answer}</s>[INST] {user2} [/INST]`.
# A literal <s> here would give two BOS tokens. The else branch serves Ollama versions without .Messages, which
# execute the template once per turn with .System/.Prompt/.Response.
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


def modelfile(source: str, system: str | None, adapter: str | None = None) -> str:
    """Ollama Modelfile: FROM a GGUF or an Ollama model, optionally with a LoRA ADAPTER beside the Modelfile;
    Mistral-Instruct's prompt, stops on the next turn or end of answer, optional SYSTEM."""
    lines = [f"FROM {source}"] + ([f"ADAPTER ./{adapter}"] if adapter else []) + [
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""', 'PARAMETER stop "[INST]"', 'PARAMETER stop "</s>"']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
