//! Chat templates rendered by icl against transformers' own rendering (`scripts/chat_template_reference.py`:
//! `render_jinja_template`, and `AutoTokenizer.apply_chat_template` on the SmolLM2 folders): the same
//! string for every template shape below, and an error where transformers raises one. Requires
//! `cargo xtask setup` (the venv; the SmolLM2 folders for the model cases).

#![allow(clippy::unwrap_used)]

use icl_data::{ChatMessage, ChatTemplate};
use icl_test_support::{models_dir, venv_python, workspace_dir};
use serde_json::{json, Value};
use std::process::Command;

const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}\n";

/// Llama 2's template: a system block folded into the first user turn, `bos_token`, `.strip()`, and
/// `raise_exception` when roles do not alternate.
const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// Gemma's: no system role at all (it raises), `|trim`, a role renamed.
const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";

/// Written over several lines, as Hub templates in `chat_template.jinja` are: `trim_blocks` and
/// `lstrip_blocks` decide every newline and indent; with `namespace`, loop controls, `tojson`,
/// Python string methods and a `{% generation %}` block.
const MULTILINE: &str = r#"{%- set ns = namespace(system=none, turns=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- set ns.system = message.content %}
        {%- continue %}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
{%- endfor %}
{%- if ns.system is not none %}
<|system|>
{{ ns.system | tojson }}
{%- endif %}
{% for message in messages if message.role != 'system' %}
  {% if message.content.startswith('STOP') %}
    {% break %}
  {% endif %}
<|{{ message.role }}|> {{ message.content.split(' ') | length }} words
  {% if message.role == 'assistant' %}
{% generation %}{{ message.content.upper() }}{% endgeneration %}
  {% else %}
{{ message.content.replace('a', 'A') | tojson }}
  {% endif %}
{% endfor %}
{{ {'turns': ns.turns, 'tools': tools, 'docs': documents, 'x': [1.5, true, none, 'é"\n']} | tojson }}
{{ {'b': 2, 'a': [1, {}]} | tojson(indent=2, sort_keys=true) }}
{% if add_generation_prompt %}<|assistant|>
{% endif %}
"#;

fn conversations() -> Vec<(&'static str, Vec<ChatMessage>)> {
    vec![
        ("user", vec![ChatMessage::new("user", "What is 2 + 2? ")]),
        (
            "system+turns",
            vec![
                ChatMessage::new("system", "Answer briefly."),
                ChatMessage::new("user", "Q: a cat\nA:"),
                ChatMessage::new("assistant", " a small feline "),
                ChatMessage::new("user", "Q: Paris?"),
            ],
        ),
        (
            "bad roles",
            vec![ChatMessage::new("user", "one"), ChatMessage::new("user", "STOP two"), ChatMessage::new("user", "x")],
        ),
    ]
}

fn messages_json(messages: &[ChatMessage]) -> Value {
    messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect()
}

#[test]
fn rendered_strings_equal_transformers() {
    let special = vec![("bos_token".to_owned(), "<s>".to_owned()), ("eos_token".to_owned(), "</s>".to_owned())];
    let templates = [("smollm2", SMOLLM2), ("llama2", LLAMA2), ("gemma", GEMMA), ("multiline", MULTILINE)];
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for (template_name, source) in templates {
        let template = ChatTemplate::new(source, format!("{template_name}.jinja"), special.clone());
        for (conversation, messages) in conversations() {
            for add_generation_prompt in [true, false] {
                let name = format!("{template_name} / {conversation} / add_generation_prompt={add_generation_prompt}");
                cases.push(json!({
                    "name": name, "template": source, "messages": messages_json(&messages),
                    "add_generation_prompt": add_generation_prompt,
                    "special_tokens": {"bos_token": "<s>", "eos_token": "</s>"},
                }));
                ours.push((name, template.render(&messages, add_generation_prompt).map_err(|e| e.to_string())));
            }
        }
    }
    // The SmolLM2 folders: icl's import and transformers' own save of the same GGUF.
    let (native, reference) =
        (models_dir().join("smollm2-135m-instruct"), models_dir().join("smollm2-135m-instruct-hf"));
    assert!(reference.is_dir() && native.is_dir(), "{}: missing, run `cargo xtask setup`", native.display());
    let folder_template = ChatTemplate::from_model_dir(&native, None)
        .unwrap()
        .unwrap_or_else(|| panic!("{}: no chat template; re-import it (`cargo xtask setup` does)", native.display()));
    for (conversation, messages) in conversations() {
        let name = format!("smollm2 folder / {conversation}");
        cases.push(json!({
            "name": name, "model": reference, "messages": messages_json(&messages), "add_generation_prompt": true,
        }));
        ours.push((name, folder_template.render(&messages, true).map_err(|e| e.to_string())));
    }

    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("cases.json"), dir.path().join("rendered.json"));
    std::fs::write(&input, serde_json::to_string(&cases).unwrap()).unwrap();
    let run = Command::new(venv_python())
        .arg(workspace_dir().join("scripts/chat_template_reference.py"))
        .arg(&input)
        .arg(&output)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(run.status.success(), "chat_template_reference.py failed:\n{}", String::from_utf8_lossy(&run.stderr));
    let theirs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    assert_eq!(theirs.len(), ours.len());
    let (mut equal, mut errors) = (0, 0);
    for ((name, mine), reference) in ours.iter().zip(&theirs) {
        assert_eq!(reference["name"].as_str(), Some(name.as_str()));
        match (mine, reference.get("text").and_then(Value::as_str), reference.get("error").and_then(Value::as_str)) {
            (Ok(text), Some(expected), _) => {
                assert_eq!(text, expected, "{name}: rendered strings differ");
                equal += 1;
            }
            (Err(message), None, Some(expected)) => {
                // The same error: the template's own message, and the file it came from.
                assert!(message.contains(expected), "{name}: {message:?} does not carry transformers' {expected:?}");
                assert!(message.contains(".jinja"), "{name}: {message:?} does not name the template");
                errors += 1;
            }
            (mine, _, _) => panic!("{name}: icl gives {mine:?}, transformers {reference}"),
        }
    }
    println!("{equal} rendered strings equal to transformers', {errors} errors raised by both");
    // Every shape rendered, and the raising templates raised.
    assert!(equal >= 20 && errors >= 4, "{equal} equal, {errors} errors");
}
