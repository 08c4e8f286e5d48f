// Renders an Ollama TEMPLATE for conversations the way Ollama fills it (its server/routes.go and template/template.go),
// for the export's check and the tests: the Modelfile's SYSTEM goes first when a request has no system message;
// consecutive messages of one role are merged with a blank line between them; system messages are joined by blank
// lines into .System and also kept in .Messages; the template runs once with .Messages, or, for Ollama versions
// without .Messages ("legacy": true), once per turn with .System, .Prompt and .Response. Reads
// {"template": ..., "cases": [{"messages": [...], "system": ..., "legacy": ...}]} on stdin, writes the texts as JSON.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Messages []Message `json:"messages"`
	System   string    `json:"system"`
	Legacy   bool      `json:"legacy"`
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

// withSystem: the Modelfile's SYSTEM as Ollama's chat handler adds it.
func withSystem(messages []Message, system string) []Message {
	if system != "" && (len(messages) == 0 || messages[0].Role != "system") {
		return append([]Message{{Role: "system", Content: system}}, messages...)
	}
	return messages
}

// collate: consecutive messages of one role merged, and every system message's text, as Ollama's collate does.
func collate(messages []Message) (string, []Message) {
	var system []string
	var collated []Message
	for _, m := range messages {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role && m.Role != "tool" {
			collated[n-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, m)
		}
	}
	return strings.Join(system, "\n\n"), collated
}

// legacy: one execution per turn. Ollama cuts the last turn's template after {{ .Response }}; ours guard all that
// follows it with {{ if .Response }}, so running it with the (empty) last response renders the same text.
func legacy(t *template.Template, b *strings.Builder, messages []Message) {
	var system, prompt, response string
	execute := func() {
		must(t.Execute(b, map[string]any{"System": system, "Prompt": prompt, "Response": response}))
		system, prompt, response = "", "", ""
	}
	for _, m := range messages {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				execute()
			}
			system = m.Content
		case "user":
			if response != "" {
				execute()
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	execute()
}

func main() {
	var input struct {
		Template string `json:"template"`
		Cases    []Case `json:"cases"`
	}
	must(json.NewDecoder(os.Stdin).Decode(&input))
	t := template.Must(template.New("").Option("missingkey=zero").Parse(input.Template))
	out := []string{}
	for _, c := range input.Cases {
		var b strings.Builder
		system, messages := collate(withSystem(c.Messages, c.System))
		if c.Legacy {
			legacy(t, &b, messages)
		} else {
			must(t.Execute(&b, map[string]any{"System": system, "Messages": messages, "Response": ""}))
		}
		out = append(out, b.String())
	}
	must(json.NewEncoder(os.Stdout).Encode(out))
}
