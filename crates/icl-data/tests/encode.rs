//! lm-evaluation-harness's token rules with the real GPT-2 tokenizer (made by `cargo xtask setup`).
#![allow(clippy::unwrap_used)]

use icl_data::{encode_requests, EncodeOptions, Request, Tokenizer};
use std::path::PathBuf;

fn tokenizer() -> Tokenizer {
    let path = icl_test_support::models_dir().join("gpt-neo-tiny/tokenizer.json");
    assert!(path.is_file(), "{}: missing, run `cargo xtask setup`", path.display());
    Tokenizer::from_file(&path).expect("tokenizer")
}

fn request(context: &str, continuation: &str) -> Request {
    Request { example: 7, choice: 0, context: context.into(), continuation: continuation.into() }
}

const OPTIONS: EncodeOptions = EncodeOptions { max_length: 2048, prefix_token: 50256 };

#[test]
fn continuation_tokens_follow_the_context_tokens() {
    let tok = tokenizer();
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
    let e = &encode_requests(&tok, "t", &[request("Hello", " world")], OPTIONS).unwrap()[0];
    assert_eq!(e.targets, vec![995]);
    assert_eq!(e.input, vec![15496]);
    assert!(!e.truncated);
    // Trailing space of the context moves into the continuation, as lm-eval does.
    let e = &encode_requests(&tok, "t", &[request("Hello ", "world")], OPTIONS).unwrap()[0];
    assert_eq!((e.input.clone(), e.targets.clone()), (vec![15496], vec![995]));
}

#[test]
fn empty_context_is_the_prefix_token() {
    let tok = tokenizer();
    let e = &encode_requests(&tok, "t", &[request("", " world")], OPTIONS).unwrap()[0];
    assert_eq!(e.input, vec![50256]);
    assert_eq!(e.targets, vec![995]);
}

#[test]
fn long_inputs_lose_tokens_on_the_left() {
    let tok = tokenizer();
    let context = "one two three four five six seven eight nine ten";
    let full = tok.encode(&format!("{context} eleven")).unwrap();
    let options = EncodeOptions { max_length: 5, ..OPTIONS };
    let e = &encode_requests(&tok, "t", &[request(context, " eleven")], options).unwrap()[0];
    assert!(e.truncated);
    assert_eq!(e.input.len(), 5);
    // The kept window is the last max_length + 1 tokens without the final one.
    assert_eq!(e.input, full[full.len() - 6..full.len() - 1].to_vec());
    assert_eq!(e.targets, full[full.len() - 1..].to_vec());
}

#[test]
fn unscorable_continuations_are_errors_naming_the_example() {
    let tok = tokenizer();
    let e = encode_requests(&tok, "lambada", &[request("Hello", "")], OPTIONS).unwrap_err().to_string();
    assert!(e.contains("lambada example 7") && e.contains("no tokens"), "{e}");
    let options = EncodeOptions { max_length: 2, ..OPTIONS };
    let e = encode_requests(&tok, "lambada", &[request("Hello", " one two three")], options).unwrap_err().to_string();
    assert!(e.contains("more than the model's maximum length 2"), "{e}");
}

/// Generation tasks: the default length cap is the longest answer or alias in tokens (over every
/// row, whatever the limit), prompts lose tokens on the left to leave room for it, and the stop
/// sequence defaults to the example delimiter.
#[test]
fn generation_requests_cap_truncate_and_stop() {
    use icl_data::{generation_requests, prompts, GenerationExample, PromptOptions, Task, TaskExamples};
    let tok = tokenizer();
    let task = Task {
        name: "qa".into(),
        path: PathBuf::from("qa.jsonl"),
        examples: TaskExamples::GenerationWithAnswers(vec![
            GenerationExample {
                context: "Question: Hello?\nAnswer:".into(),
                answer: "world".into(),
                aliases: vec![],
                chain_of_thought: None,
            },
            GenerationExample {
                context: "Question: Who?\nAnswer:".into(),
                answer: "x".into(),
                aliases: vec!["Hello world Hello world".into()],
                chain_of_thought: None,
            },
        ]),
    };
    let options = PromptOptions::default();
    let p = prompts(&task, &options, Some(1)).unwrap();
    let plan = generation_requests(&tok, &task, &p, &options, 2048, 50256).unwrap();
    assert_eq!(plan.max_new_tokens, tok.encode("Hello world Hello world").unwrap().len());
    assert_eq!(plan.stop_sequences, vec!["\n".to_owned()]);
    assert_eq!(plan.requests.len(), 1);
    let r = &plan.requests[0];
    assert_eq!((r.input.clone(), r.truncated), (tok.encode("Question: Hello?\nAnswer:").unwrap(), false));
    assert_eq!(r.answers, vec!["world".to_owned()]);

    let options = PromptOptions {
        max_new_tokens: Some(4),
        stop_sequences: Some(vec!["".into(), ".".into()]),
        ..Default::default()
    };
    let full = tok.encode("Question: Hello?\nAnswer:").unwrap();
    let plan = generation_requests(&tok, &task, &p, &options, 7, 50256).unwrap();
    assert_eq!((plan.max_new_tokens, plan.stop_sequences.clone()), (4, vec![".".to_owned()]));
    assert_eq!((plan.requests[0].input.clone(), plan.requests[0].truncated), (full[full.len() - 3..].to_vec(), true));
    let e = generation_requests(&tok, &task, &p, &options, 4, 50256).unwrap_err().to_string();
    assert!(e.contains("qa") && e.contains("max_new_tokens 4 leaves no room"), "{e}");
}
