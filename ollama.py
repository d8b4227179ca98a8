"""An Ollama Modelfile beside an exported GGUF: the chat format nanolora trains with, as a Go template.

Its own file because Ollama is a third program with its own language: the GGUF carries the
weights and the Jinja chat template (llama.cpp's), while Ollama renders chats with a Go
text/template from the Modelfile, written here by hand for each of tokenizer.py's formats and
checked by rendering it against the published templates (tests/test_ollama.py). The Modelfile
names the GGUF (FROM), gives the template (TEMPLATE), the default system prompt (SYSTEM) and a
stop for each token that ends a reply; `ollama create NAME -f Modelfile` makes a model of it.
"""
from tokenizer import MISTRAL, Tokenizer


def go_template(tok):
    """The chat format nanolora trains with (tokenizer.render_chat), as an Ollama Go template:
    .System is the chat's system prompt or the Modelfile's SYSTEM, .Messages the turns."""
    if tok.template in ("chatml", "qwen3"):  # Ollama keeps Qwen3's reasoning out of .Content itself
        return ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                '{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n'
                '{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n')
    if tok.template == "llama3":  # BOS is not in the template: the GGUF says add_bos
        system = "<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
        if tok.system_date:  # Llama 3.1+: a system header with the date, always
            system = system.replace("{{ .System }}", "Cutting Knowledge Date: December 2023\n"
                                    f"Today Date: {tok.system_date}\n\n{{{{ .System }}}}")
        else:
            system = "{{- if .System }}" + system + "{{ end }}"
        return (system + '{{- range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}'
                '<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}'
                '<|start_header_id|>assistant<|end_header_id|>\n\n')
    # Llama 2 and Mistral 7B: BOS only before later user turns (Llama 2's), the first comes from
    # add_bos. Their templates strip each message (Llama 2) or each reply (v0.3): Ollama's Go
    # template has no function for it, so a message sent with spaces around it keeps them.
    first, eos = '{{- $first := true }}{{- range .Messages }}', tok.eos_text
    if tok.template == "llama2":
        return (first + '{{- if eq .Role "user" }}{{ if not $first }}' + tok.bos_text + '{{ end }}[INST] '
                '{{ if and $first $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]'
                '{{ $first = false }}{{ else if eq .Role "assistant" }} {{ .Content }} ' + eos + '{{ end }}{{ end }}')
    if tok.template in MISTRAL:
        inst, close, reply = MISTRAL[tok.template]
        if tok.template == "mistral_v3":  # the system prompt in the last message if it is the user's (loop.last)
            first, here, seen = "{{- range $i, $_ := .Messages }}", "(eq (len (slice $.Messages $i)) 1)", ""
        else:  # in the first user turn
            here, seen = "$first", "{{ $first = false }}"
        return (first + '{{- if eq .Role "user" }}' + inst + '{{ if and ' + here + ' $.System }}{{ $.System }}\n\n'
                '{{ end }}{{ .Content }}' + close + seen + '{{ else if eq .Role "assistant" }}' + reply
                + '{{ .Content }}' + eos + '{{ end }}{{ end }}')
    return None


def modelfile(gguf_file, path, adapter_file=None):
    """An Ollama Modelfile: the GGUF (with the adapter GGUF on it, if given), the chat template of
    checkpoint folder `path`, the template's default system prompt, and a stop for every token that
    ends a reply."""
    tok = Tokenizer(path)
    lines = [f"FROM ./{gguf_file}"] + ([f"ADAPTER ./{adapter_file}"] if adapter_file else [])
    if template := go_template(tok):
        lines.append(f'TEMPLATE """{template}"""')
    if tok.default_system:
        lines.append(f'SYSTEM """{tok.default_system}"""')
    lines += [f'PARAMETER stop "{tok.tok.id_to_token(i)}"' for i in sorted(tok.eos_ids)]
    return "\n".join(lines) + "\n"
