//! Prompts (llm-foundry's format) and the requests that score them.
//!
//! With `strip(s)` Python's `str.strip()`, `preamble` = `prompt_string` followed by the shots, each
//! shot preceded by `example_delimiter` when anything comes before it:
//!
//! | type | shot text | scored context(s) | target(s) |
//! |---|---|---|---|
//! | language_modeling | `pre + strip(context) + cd + strip(continuation)` | `rstrip(preamble + ed? + pre + strip(context) + cd)` | `" " + strip(continuation)` |
//! | multiple_choice | `pre + strip(query) + cd + strip(choices[gold])` | `rstrip(preamble + ed? + pre + strip(query) + cd)` | `" " + strip(choice)` each |
//! | schema | `pre + ed? + strip(options[gold]) + cd + strip(continuation)` (no `ed` before the first) | `pre + strip(option)` alone; with a preamble `preamble + pre + ed + strip(option) + rstrip(cd)`, each | `" " + strip(continuation)` |
//! | generation_task_with_answers | `pre + strip(context) + cd + answer`, `answer` = `strip(chain_of_thought) + cot_delimiter + strip(answer)` when the file has chains of thought, else `strip(answer)` | `rstrip(preamble + ed? + pre + strip(context) + cd)` | the accepted answers, as written (not scored: the model generates after the context) |
//! | perplexity | (zero-shot only) | empty | `text`, as written (scored in rolling windows, see [`crate::encode_rolling`]) |
//!
//! (`cd` = `continuation_delimiter`, `pre` = `prelimiter` (llm-foundry's `question_prelimiter`), `ed?` =
//! `example_delimiter` if the preamble is not empty; shots other than schema's are each preceded by
//! `ed?`.) This is
//! llm-foundry's `InContextLearning*Dataset` text: its `construct_context`, the `rstrip` of the
//! scored context, the prefix space its GPT-2-style tokenizers get before the answer, and the schema
//! task's `_construct_multiple_contexts` (which adds no continuation delimiter when there is no
//! preamble); generation tasks are `InContextLearningGenerationTaskWithAnswersDataset`'s (the base
//! class's context, shots showing the chain of thought when the file has the `chain_of_thought` field,
//! answers = {answer} ∪ aliases).
//! Zero-shot with the defaults this is `strip(context)` and `" " + strip(target)`, the convention of
//! the project's lm-evaluation-harness parity tasks. Tokens then follow
//! lm-evaluation-harness's rule on the whole context (see [`crate::encode_requests`]); llm-foundry
//! instead tokenizes the preamble and the example's context separately.
//!
//! With [`FewshotSampler::LmEval`] the prompt is lm-eval 0.4.13's instead (`ConfigurableTask.
//! fewshot_context` and `construct_requests`, plain text, with `doc_to_text` = `strip(question)`,
//! the answer `strip(answer)` and `target_delimiter` = `cd`): `lead` = `prompt_string` (lm-eval's
//! `description`, put as it is) followed by `q + cd + a + ed` for each shot (`ed` after every
//! shot: lm-eval's `fewshot_delimiter`, `"\n\n"` unless set); each scored context is
//! `lead + strip(question)` (schema: `lead + strip(option)`) with nothing stripped, each target
//! `cd + strip(target)`. Zero-shot with the default `cd` this equals the table above.

use crate::chat::ChatTemplate;
use crate::fewshot::{shot_rows, FewshotSampler};
use crate::{Error, Result, Task, TaskExamples};

/// llm-foundry's prompt options; `Default` gives its defaults (zero-shot, seed 1234, `"\n"` between
/// examples, `" "` between context and answer, no prompt string, no prelimiter) with icl's shot
/// choice. Stops, caps, the chain-of-thought delimiter and normalization only concern generation
/// tasks (see [`crate::generation_requests`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptOptions {
    pub num_fewshot: usize,
    pub fewshot_seed: u64,
    /// Whose rule picks the shots; [`FewshotSampler::LmEval`] also lays out the prompt as lm-eval does.
    pub fewshot_sampler: FewshotSampler,
    /// Put once before the shots and the example.
    pub prompt_string: String,
    /// Put before each shot and before the example when anything precedes it (lm-eval: after each
    /// shot). `None`: the sampler's default, see [`PromptOptions::example_delimiter`].
    pub example_delimiter: Option<String>,
    /// Put between a context and its answer (lm-eval's `target_delimiter`).
    pub continuation_delimiter: String,
    /// Generation: most new tokens per example; `None` is llm-foundry's default, the token count of
    /// the longest answer or alias of the task.
    pub max_new_tokens: Option<usize>,
    /// Generation: stop sequences (llm-foundry's `early_stopping_criteria`); `None` stops at the
    /// example delimiter.
    pub stop_sequences: Option<Vec<String>>,
    /// lm-eval's `--system_instruction`: a system turn under a chat template, else put right before
    /// the prompt (see [`crate::chat`]).
    pub system_instruction: Option<String>,
    /// lm-eval's `--apply_chat_template`: prompts are conversations rendered by this template.
    pub chat_template: Option<ChatTemplate>,
    /// lm-eval's `--fewshot_as_multiturn`: under a chat template, each shot is a user and an
    /// assistant turn rather than part of one user turn.
    pub fewshot_as_multiturn: bool,
    /// Put before every context, the shots' and the example's (llm-foundry's `question_prelimiter`).
    pub prelimiter: String,
    /// Generation: between a shot's chain of thought and its answer; a non-empty one also takes the
    /// answer from the output after its last occurrence (llm-foundry's `cot_delimiter`).
    pub cot_delimiter: String,
    /// Generation: compare normalized answers (llm-foundry's `do_normalization`, default true);
    /// false compares them with white space stripped only.
    pub normalize_answers: bool,
}

impl Default for PromptOptions {
    fn default() -> Self {
        Self {
            num_fewshot: 0,
            fewshot_seed: 1234,
            fewshot_sampler: FewshotSampler::default(),
            prompt_string: String::new(),
            example_delimiter: None,
            continuation_delimiter: " ".into(),
            max_new_tokens: None,
            stop_sequences: None,
            system_instruction: None,
            chat_template: None,
            fewshot_as_multiturn: false,
            prelimiter: String::new(),
            cot_delimiter: String::new(),
            normalize_answers: true,
        }
    }
}

impl PromptOptions {
    /// The example delimiter in effect: the one set, else lm-eval's `fewshot_delimiter` `"\n\n"` with
    /// the lm-eval sampler and llm-foundry's `"\n"` otherwise.
    pub fn example_delimiter(&self) -> &str {
        self.example_delimiter.as_deref().unwrap_or(self.fewshot_sampler.default_example_delimiter())
    }
}

/// The prompt strings of one example: one context and a target per choice (language modelling,
/// multiple choice), or a context per option and one shared target (schema).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Row of the task file (0-based).
    pub example: usize,
    /// Rows of the task file (0-based) shown as shots, in prompt order.
    pub shots: Vec<usize>,
    pub contexts: Vec<String>,
    /// Scored continuations; for generation tasks the accepted answers, which are not scored.
    pub targets: Vec<String>,
    /// A generation task's prompt: the model generates after the context, nothing is scored.
    pub generate: bool,
}

/// A context and the continuation to score after it, for one example (and one option of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Row of the task file (0-based).
    pub example: usize,
    /// Choice (multiple choice) or context option (schema) index; 0 for language modelling.
    pub choice: usize,
    pub context: String,
    pub continuation: String,
}

fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`: Rust's `trim` misses the ASCII separators U+001C..U+001F that Python counts as
/// white space, and prompts must match lm-evaluation-harness byte for byte.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// Python's `str.rstrip()`.
pub fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(is_py_space)
}

/// The prompts of the first `limit` examples of a task (all without a limit). Shots come from every
/// row of the task, whatever the limit, and are drawn for the examples in row order, so a prompt
/// never depends on how many examples are evaluated. Fails only where lm-eval would (its sampler
/// needs more rows than shots).
/// The chat fields of `options` are not used here (see [`crate::build_prompts`]).
pub fn prompts(task: &Task, options: &PromptOptions, limit: Option<usize>) -> Result<Vec<Prompt>> {
    let n = limit.map_or(task.len(), |l| l.min(task.len()));
    let sampler = options.fewshot_sampler;
    let all_shots = shot_rows(sampler, &task.examples, options.num_fewshot, options.fewshot_seed, n).map_err(|e| {
        Error::Example {
            task: task.name.clone(),
            index: e.doc,
            message: format!("{e}; give fewer shots than the task's {} rows", task.len()),
        }
    })?;
    let cd = options.continuation_delimiter.as_str();
    let ed = options.example_delimiter();
    let pre = options.prelimiter.as_str();
    let lm_eval = sampler == FewshotSampler::LmEval;
    let schema = task.kind() == crate::TaskKind::Schema;
    // A shot's question (after the prelimiter, except schema's) and its gold answer.
    let shot = |i: usize| -> (String, String) {
        match &task.examples {
            TaskExamples::LanguageModeling(v) => {
                (format!("{pre}{}", py_strip(&v[i].context)), py_strip(&v[i].continuation).to_owned())
            }
            TaskExamples::MultipleChoice(v) => {
                (format!("{pre}{}", py_strip(&v[i].query)), py_strip(&v[i].choices[v[i].gold]).to_owned())
            }
            TaskExamples::Schema(v) => {
                (py_strip(&v[i].context_options[v[i].gold]).to_owned(), py_strip(&v[i].continuation).to_owned())
            }
            TaskExamples::GenerationWithAnswers(v) => {
                let answer = match &v[i].chain_of_thought {
                    Some(cot) => format!("{}{}{}", py_strip(cot), options.cot_delimiter, py_strip(&v[i].answer)),
                    None => py_strip(&v[i].answer).to_owned(),
                };
                (format!("{pre}{}", py_strip(&v[i].context)), answer)
            }
            // Perplexity tasks take no shots (refused when the task is prepared).
            TaskExamples::Perplexity(v) => (v[i].text.clone(), String::new()),
        }
    };
    let prompts = all_shots
        .into_iter()
        .enumerate()
        .map(|(example, shots)| {
            // `lead` is what comes before the example's own text.
            let mut preamble = options.prompt_string.clone();
            for &i in &shots {
                let (question, answer) = shot(i);
                if lm_eval {
                    // lm-eval's `fewshot_context`: description, then `q + target_delimiter + a +
                    // fewshot_delimiter` per shot, then the doc's `q` alone.
                    preamble.push_str(&format!("{question}{cd}{answer}{ed}"));
                } else {
                    let follows_text = !preamble.is_empty();
                    // llm-foundry's schema task puts the prelimiter before the example delimiter.
                    if schema {
                        preamble.push_str(pre);
                    }
                    if follows_text {
                        preamble.push_str(ed);
                    }
                    preamble.push_str(&format!("{question}{cd}{answer}"));
                }
            }
            let lead = if lm_eval || preamble.is_empty() { preamble.clone() } else { format!("{preamble}{ed}") };
            let scored = |text: &str| {
                if lm_eval {
                    format!("{lead}{pre}{}", py_strip(text))
                } else {
                    py_rstrip(&format!("{lead}{pre}{}{cd}", py_strip(text))).to_owned()
                }
            };
            // lm-eval puts its target delimiter before each scored target; llm-foundry a space.
            let target =
                |text: &str| if lm_eval { format!("{cd}{}", py_strip(text)) } else { format!(" {}", py_strip(text)) };
            let schema_context = |option: &str| {
                if lm_eval || preamble.is_empty() {
                    format!("{lead}{pre}{}", py_strip(option))
                } else {
                    format!("{preamble}{pre}{ed}{}{}", py_strip(option), py_rstrip(cd))
                }
            };
            let (contexts, targets, generate) = match &task.examples {
                TaskExamples::LanguageModeling(v) => {
                    (vec![scored(&v[example].context)], vec![target(&v[example].continuation)], false)
                }
                TaskExamples::MultipleChoice(v) => {
                    (vec![scored(&v[example].query)], v[example].choices.iter().map(|c| target(c)).collect(), false)
                }
                TaskExamples::GenerationWithAnswers(v) => {
                    (vec![scored(&v[example].context)], v[example].accepted(), true)
                }
                // The document as written (lm-eval's `doc_to_target`), scored after no context.
                TaskExamples::Perplexity(v) => (vec![String::new()], vec![v[example].text.clone()], false),
                TaskExamples::Schema(v) => (
                    v[example].context_options.iter().map(|o| schema_context(o)).collect(),
                    vec![target(&v[example].continuation)],
                    false,
                ),
            };
            Prompt { example, shots, contexts, targets, generate }
        })
        .collect();
    Ok(prompts)
}

/// One request per scored continuation, in example order: each target after the one context, or
/// the one target after each context. Generation prompts have none.
pub fn requests(prompts: &[Prompt]) -> Vec<Request> {
    let mut out = Vec::new();
    for p in prompts.iter().filter(|p| !p.generate) {
        if let [context] = p.contexts.as_slice() {
            out.extend(p.targets.iter().enumerate().map(|(choice, t)| Request {
                example: p.example,
                choice,
                context: context.clone(),
                continuation: t.clone(),
            }));
        } else {
            let target = &p.targets[0];
            out.extend(p.contexts.iter().enumerate().map(|(choice, c)| Request {
                example: p.example,
                choice,
                context: c.clone(),
                continuation: target.clone(),
            }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fewshot::fewshot_indices;
    use crate::{ChoiceExample, LmExample, SchemaExample};
    use std::path::PathBuf;

    fn task(examples: TaskExamples) -> Task {
        Task { name: "t".into(), path: PathBuf::new(), examples }
    }

    fn lm(rows: &[(&str, &str)]) -> Task {
        task(TaskExamples::LanguageModeling(
            rows.iter().map(|(c, k)| LmExample { context: (*c).into(), continuation: (*k).into() }).collect(),
        ))
    }

    #[test]
    fn strips_like_python() {
        assert_eq!(py_strip("\u{1f} a b\n\u{a0}"), "a b");
        assert_eq!(py_strip(""), "");
        assert_eq!(py_rstrip(" a \u{1c}"), " a");
    }

    #[test]
    fn zero_shot_is_strip_and_space() {
        let t = lm(&[(" The cat sat on the \n", "mat ")]);
        let r = requests(&prompts(&t, &PromptOptions::default(), None).unwrap());
        assert_eq!(r[0].context, "The cat sat on the");
        assert_eq!(r[0].continuation, " mat");

        let mc = task(TaskExamples::MultipleChoice(vec![ChoiceExample {
            query: "Question: why?\n".into(),
            choices: vec!["because ".into(), " so".into()],
            gold: 0,
        }]));
        let r = requests(&prompts(&mc, &PromptOptions::default(), None).unwrap());
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].example, r[1].choice), (0, 1));
        assert_eq!(r[1].context, "Question: why?");
        assert_eq!(r[1].continuation, " so");
    }

    #[test]
    fn few_shot_language_modelling_follows_llm_foundry() {
        let t = lm(&[("a1", "b1"), ("a2 ", " b2"), ("a3", "b3")]);
        let options = PromptOptions { num_fewshot: 2, ..Default::default() };
        let p = prompts(&t, &options, Some(1)).unwrap();
        assert_eq!(p.len(), 1);
        let shots = fewshot_indices(1234, 0, 3, 2);
        let text = |i: usize| format!("a{} b{}", i + 1, i + 1);
        assert_eq!(p[0].contexts, vec![format!("{}\n{}\na1", text(shots[0]), text(shots[1]))]);
        assert_eq!(p[0].targets, vec![" b1".to_owned()]);

        let options = PromptOptions {
            num_fewshot: 1,
            prompt_string: "Complete:".into(),
            example_delimiter: Some("\n\n".into()),
            continuation_delimiter: " ->".into(),
            fewshot_seed: 5,
            ..Default::default()
        };
        let p = prompts(&t, &options, None).unwrap();
        let shot = fewshot_indices(5, 2, 3, 1)[0];
        assert_eq!(p[2].contexts[0], format!("Complete:\n\na{} ->b{}\n\na3 ->", shot + 1, shot + 1));
    }

    #[test]
    fn few_shot_choices_show_the_gold_answer() {
        let mc = task(TaskExamples::MultipleChoice(vec![
            ChoiceExample { query: "Q1".into(), choices: vec!["x".into(), "y".into()], gold: 1 },
            ChoiceExample { query: "Q2".into(), choices: vec!["z".into(), "w".into()], gold: 0 },
        ]));
        let options = PromptOptions { num_fewshot: 1, continuation_delimiter: "\nA:".into(), ..Default::default() };
        let p = prompts(&mc, &options, None).unwrap();
        assert_eq!(p[0].contexts, vec!["Q2\nA:z\nQ1\nA:".to_owned()]);
        assert_eq!(p[1].contexts, vec!["Q1\nA:y\nQ2\nA:".to_owned()]);
        assert_eq!(p[1].targets, vec![" z".to_owned(), " w".to_owned()]);
    }

    #[test]
    fn schema_contexts_per_option() {
        let s = task(TaskExamples::Schema(vec![
            SchemaExample {
                context_options: vec!["Ann met Bo because Ann".into(), "Ann met Bo because Bo".into()],
                continuation: "was lonely.".into(),
                gold: 0,
            },
            SchemaExample { context_options: vec!["X or Y".into(), "Z".into()], continuation: "ok".into(), gold: 1 },
        ]));
        let p = prompts(&s, &PromptOptions::default(), None).unwrap();
        assert_eq!(p[0].contexts, vec!["Ann met Bo because Ann".to_owned(), "Ann met Bo because Bo".to_owned()]);
        assert_eq!(p[0].targets, vec![" was lonely.".to_owned()]);
        let r = requests(&p);
        assert_eq!(r.len(), 4);
        assert_eq!(
            (r[1].choice, r[1].context.as_str(), r[1].continuation.as_str()),
            (1, "Ann met Bo because Bo", " was lonely.")
        );

        let p = prompts(&s, &PromptOptions { num_fewshot: 1, ..Default::default() }, None).unwrap();
        assert_eq!(
            p[0].contexts,
            vec!["Z ok\nAnn met Bo because Ann".to_owned(), "Z ok\nAnn met Bo because Bo".to_owned()]
        );
        assert_eq!(p[1].contexts[0], "Ann met Bo because Ann was lonely.\nX or Y");
    }

    #[test]
    fn generation_prompts_follow_llm_foundry() {
        use crate::GenerationExample;
        let g = task(TaskExamples::GenerationWithAnswers(vec![
            GenerationExample {
                context: " Question: A?\nAnswer:".into(),
                answer: " x ".into(),
                aliases: vec!["X".into(), " x ".into()],
                chain_of_thought: None,
            },
            GenerationExample {
                context: "Question: B?\nAnswer:".into(),
                answer: "y".into(),
                aliases: vec![],
                chain_of_thought: None,
            },
        ]));
        let p = prompts(&g, &PromptOptions::default(), None).unwrap();
        assert_eq!(p[0].contexts, vec!["Question: A?\nAnswer:".to_owned()]);
        assert_eq!(p[0].targets, vec![" x ".to_owned(), "X".to_owned()]);
        assert!(p[0].generate);
        assert!(requests(&p).is_empty());
        let options = PromptOptions { num_fewshot: 1, prompt_string: "Trivia.".into(), ..Default::default() };
        let p = prompts(&g, &options, None).unwrap();
        assert_eq!(p[0].contexts[0], "Trivia.\nQuestion: B?\nAnswer: y\nQuestion: A?\nAnswer:");
        assert_eq!(p[1].contexts[0], "Trivia.\nQuestion: A?\nAnswer: x\nQuestion: B?\nAnswer:");
        let options = PromptOptions {
            num_fewshot: 1,
            continuation_delimiter: " -> ".into(),
            example_delimiter: Some("\n\n".into()),
            ..Default::default()
        };
        assert_eq!(
            prompts(&g, &options, Some(1)).unwrap()[0].contexts[0],
            "Question: B?\nAnswer: -> y\n\nQuestion: A?\nAnswer: ->"
        );
    }

    #[test]
    fn lm_eval_layout_is_fewshot_context() {
        // lm-eval 0.4.13: `q + target_delimiter + a + fewshot_delimiter` per shot, then `q`; the
        // target is `target_delimiter + choice`; nothing is stripped after the join.
        let mc = task(TaskExamples::MultipleChoice(vec![
            ChoiceExample { query: " Q1 ".into(), choices: vec!["x".into(), " y".into()], gold: 1 },
            ChoiceExample { query: "Q2".into(), choices: vec!["z ".into(), "w".into()], gold: 0 },
        ]));
        let options = PromptOptions { num_fewshot: 1, fewshot_sampler: FewshotSampler::LmEval, ..Default::default() };
        assert_eq!(options.example_delimiter(), "\n\n");
        let p = prompts(&mc, &options, None).unwrap();
        assert_eq!((p[0].shots.as_slice(), p[1].shots.as_slice()), (&[1][..], &[0][..]));
        assert_eq!(p[0].contexts, vec!["Q2 z\n\nQ1".to_owned()]);
        assert_eq!(p[1].contexts, vec!["Q1 y\n\nQ2".to_owned()]);
        assert_eq!(p[1].targets, vec![" z".to_owned(), " w".to_owned()]);
        let options = PromptOptions {
            prompt_string: "Answer.\n".into(),
            example_delimiter: Some("\n###\n".into()),
            continuation_delimiter: "\nA:".into(),
            ..options
        };
        let p = prompts(&mc, &options, None).unwrap();
        assert_eq!(p[0].contexts, vec!["Answer.\nQ2\nA:z\n###\nQ1".to_owned()]);
        assert_eq!(p[0].targets, vec!["\nA:x".to_owned(), "\nA:y".to_owned()]);

        let s = task(TaskExamples::Schema(vec![
            SchemaExample { context_options: vec!["A1".into(), "A2".into()], continuation: "end".into(), gold: 0 },
            SchemaExample { context_options: vec!["B1".into(), "B2 ".into()], continuation: " fin".into(), gold: 1 },
        ]));
        let options = PromptOptions { num_fewshot: 1, fewshot_sampler: FewshotSampler::LmEval, ..Default::default() };
        let p = prompts(&s, &options, None).unwrap();
        assert_eq!(p[0].contexts, vec!["B2 fin\n\nA1".to_owned(), "B2 fin\n\nA2".to_owned()]);
        assert_eq!(p[0].targets, vec![" end".to_owned()]);
        // Zero-shot the two layouts agree.
        let zero = PromptOptions { num_fewshot: 0, ..options };
        assert_eq!(prompts(&s, &zero, None).unwrap(), prompts(&s, &PromptOptions::default(), None).unwrap());
        assert_eq!(prompts(&mc, &zero, None).unwrap(), prompts(&mc, &PromptOptions::default(), None).unwrap());
    }

    #[test]
    fn peer_samplers_choose_the_shots() {
        let rows: Vec<(String, String)> = (0..12).map(|i| (format!("c{i}"), format!("k{i}"))).collect();
        let refs: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let t = lm(&refs);
        let options =
            PromptOptions { num_fewshot: 2, fewshot_sampler: FewshotSampler::LlmFoundry, ..Default::default() };
        let p = prompts(&t, &options, Some(5)).unwrap();
        let expected = crate::llm_foundry_shots(12, 2, 1234);
        for (prompt, shots) in p.iter().zip(&expected) {
            assert_eq!(&prompt.shots, shots);
            let [a, b] = shots[..] else { panic!("{shots:?}") };
            assert_eq!(prompt.contexts[0], format!("c{a} k{a}\nc{b} k{b}\nc{}", prompt.example));
        }
        let options = PromptOptions { fewshot_sampler: FewshotSampler::LmEval, fewshot_seed: 3, ..options };
        let expected = crate::lm_eval_shots_same_split(12, 2, 3).unwrap();
        let p = prompts(&t, &options, None).unwrap();
        assert!(p.iter().zip(&expected).all(|(prompt, shots)| &prompt.shots == shots));
        // lm-eval draws k + 1 of the pool: 12 shots of 12 rows fail, naming the task and the example.
        let options = PromptOptions { num_fewshot: 12, ..options };
        let err = prompts(&t, &options, None).unwrap_err().to_string();
        assert!(err.starts_with("t example 0: lm-eval cannot draw") && err.contains("12 rows"), "{err}");
    }

    #[test]
    fn prelimiter_and_chain_of_thought_follow_llm_foundry() {
        use crate::GenerationExample;
        let g = task(TaskExamples::GenerationWithAnswers(vec![
            GenerationExample {
                context: "A?".into(),
                answer: " 1 ".into(),
                aliases: vec![],
                chain_of_thought: Some(" 0 + 1 ".into()),
            },
            GenerationExample {
                context: "B?".into(),
                answer: "2".into(),
                aliases: vec![],
                chain_of_thought: Some("1 + 1".into()),
            },
        ]));
        let options = PromptOptions {
            num_fewshot: 1,
            prelimiter: "Question: ".into(),
            continuation_delimiter: "\n\nA:".into(),
            cot_delimiter: "The answer is ".into(),
            ..Default::default()
        };
        let p = prompts(&g, &options, None).unwrap();
        // InContextLearningDataset.construct_context: ed + prelimiter + context + cd (+ answer).
        assert_eq!(p[0].contexts[0], "Question: B?\n\nA:1 + 1The answer is 2\nQuestion: A?\n\nA:");
        // Schema: _construct_multiple_contexts puts the prelimiter before the example delimiter.
        let s = task(TaskExamples::Schema(vec![
            SchemaExample { context_options: vec!["a1".into(), "a2".into()], continuation: "c".into(), gold: 1 },
            SchemaExample { context_options: vec!["b1".into(), "b2".into()], continuation: "d".into(), gold: 0 },
        ]));
        let options = PromptOptions { prelimiter: "P:".into(), ..Default::default() };
        assert_eq!(prompts(&s, &options, None).unwrap()[0].contexts, vec!["P:a1".to_owned(), "P:a2".to_owned()]);
        let options = PromptOptions { num_fewshot: 1, prelimiter: "P:".into(), ..Default::default() };
        assert_eq!(
            prompts(&s, &options, None).unwrap()[0].contexts,
            vec!["P:b1 dP:\na1".to_owned(), "P:b1 dP:\na2".to_owned()]
        );
    }

    #[test]
    fn prompts_do_not_depend_on_the_limit() {
        let rows: Vec<(String, String)> = (0..50).map(|i| (format!("c{i}"), format!("k{i}"))).collect();
        let refs: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let t = lm(&refs);
        let options = PromptOptions { num_fewshot: 3, ..Default::default() };
        let all = prompts(&t, &options, None).unwrap();
        assert_eq!(prompts(&t, &options, Some(10)).unwrap(), all[..10]);
        assert!(all.iter().all(|p| !p.contexts[0].contains(&format!("c{} k{}", p.example, p.example))));
    }
}
