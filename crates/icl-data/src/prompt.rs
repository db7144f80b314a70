//! Zero-shot prompts: one [`Request`] per scored continuation.

use crate::{Task, TaskExamples};

/// A context and the continuation to score after it, for one example (and one choice of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Row of the task file (0-based).
    pub example: usize,
    /// Choice index for multiple choice, 0 for language modelling.
    pub choice: usize,
    pub context: String,
    pub continuation: String,
}

/// Python's `str.strip()`: Rust's `trim` misses the ASCII separators U+001C..U+001F that Python counts as
/// white space, and prompts must match lm-evaluation-harness byte for byte.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The zero-shot requests of a task: the context is the stripped `context` (or `query`), each
/// continuation is `" " + target.strip()`. Requests come in example order, choices in order.
pub fn requests(task: &Task) -> Vec<Request> {
    match &task.examples {
        TaskExamples::LanguageModeling(rows) => rows
            .iter()
            .enumerate()
            .map(|(example, row)| Request {
                example,
                choice: 0,
                context: py_strip(&row.context).to_owned(),
                continuation: format!(" {}", py_strip(&row.continuation)),
            })
            .collect(),
        TaskExamples::MultipleChoice(rows) => rows
            .iter()
            .enumerate()
            .flat_map(|(example, row)| {
                let context = py_strip(&row.query);
                row.choices.iter().enumerate().map(move |(choice, text)| Request {
                    example,
                    choice,
                    context: context.to_owned(),
                    continuation: format!(" {}", py_strip(text)),
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChoiceExample, LmExample};
    use std::path::PathBuf;

    #[test]
    fn strips_like_python() {
        assert_eq!(py_strip("\u{1f} a b\n\u{a0}"), "a b");
        assert_eq!(py_strip(""), "");
    }

    #[test]
    fn builds_zero_shot_requests() {
        let lm = Task {
            name: "lm".into(),
            path: PathBuf::new(),
            examples: TaskExamples::LanguageModeling(vec![LmExample {
                context: " The cat sat on the \n".into(),
                continuation: "mat ".into(),
            }]),
        };
        let r = requests(&lm);
        assert_eq!(r[0].context, "The cat sat on the");
        assert_eq!(r[0].continuation, " mat");

        let mc = Task {
            name: "mc".into(),
            path: PathBuf::new(),
            examples: TaskExamples::MultipleChoice(vec![ChoiceExample {
                query: "Question: why?\n".into(),
                choices: vec!["because ".into(), " so".into()],
                gold: 0,
            }]),
        };
        let r = requests(&mc);
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].example, r[1].choice), (0, 1));
        assert_eq!(r[1].context, "Question: why?");
        assert_eq!(r[1].continuation, " so");
    }
}
